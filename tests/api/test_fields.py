"""Values PostgreSQL cannot hold are the client's mistake: a clear 4xx at the edge, never a 503
that blames the database (and invites a retry that can never succeed)."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from fastapi import FastAPI
from jose import jwt

from api.app.core.config import Settings
from tests.conftest import PASSWORD, Users
from tests.images import encode, split_colour


def no_outage(r: httpx.Response) -> None:
    assert 400 <= r.status_code < 500, (r.request.url, r.status_code, r.text)
    assert "Retry-After" not in r.headers


async def test_nul_characters_are_refused_where_they_would_be_stored(
    client: httpx.AsyncClient, users: Users, admin_headers: dict[str, str]
) -> None:
    user, headers = await users.create()
    # Built by hand: httpx would percent-encode the NUL, as browsers do; other clients send it raw.
    boundary = "portal-test-boundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a\x00b.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + encode(split_colour(), "PNG")
        + f"\r\n--{boundary}--\r\n".encode()
    )
    upload = await client.post(
        "/v1/images",
        content=body,
        headers={**headers, "Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    no_outage(upload)
    assert upload.status_code == 422 and "NUL" in upload.json()["detail"]
    named = await client.patch(f"/v1/users/{user['id']}", json={"name": "x\x00y"}, headers=admin_headers)
    no_outage(named)
    classic = await client.post(
        "/feedback/", json={"feedback": "fine\x00", "predicted_class": "macaw"}, headers=headers
    )
    no_outage(classic)
    export = await client.get("/v1/admin/feedback-export", params={"model": "sketch\x00"}, headers=admin_headers)
    no_outage(export)
    login = await client.post("/v1/auth/login", data={"username": "a\x00@example.com", "password": PASSWORD})
    assert login.status_code == 401
    # A password is text too: argon2 hashes its UTF-8 bytes, which a lone surrogate does not have.
    for bad in ("abcdefgh\udc00ijk", "abcdefgh\x00ijk"):
        changed = await client.patch(
            "/v1/users/me/password", **as_json({"current_password": PASSWORD, "new_password": bad}, headers)
        )
        assert changed.status_code == 422, changed.text
        current = await client.patch(
            "/v1/users/me/password", **as_json({"current_password": bad, "new_password": PASSWORD + "x"}, headers)
        )
        assert current.status_code == 422, current.text
        for path in ("/v1/users", "/user/"):
            email = f"pw-{uuid.uuid4().hex[:8]}@example.com"
            created = await client.post(path, **as_json({"email": email, "password": bad}, admin_headers))
            assert created.status_code == 422, (path, created.text)


def as_json(body: dict[str, str], headers: dict[str, str]) -> dict[str, Any]:
    """A JSON request as json.dumps writes it: lone surrogates escaped, as a client may send them."""
    return {"content": json.dumps(body), "headers": {**headers, "Content-Type": "application/json"}}


async def test_numbers_beyond_the_database_columns_are_422(
    client: httpx.AsyncClient, users: Users, admin_headers: dict[str, str]
) -> None:
    _, headers = await users.create()
    for path in ("/v1/images", "/v1/predictions", "/v1/feedback", "/v1/users"):
        r = await client.get(path, params={"skip": 9223372036854775808}, headers=admin_headers)
        no_outage(r)
        assert r.status_code == 422, path
    for method in ("GET", "PATCH", "DELETE"):
        r = await client.request(method, "/v1/users/2147483648", json={"name": "x"}, headers=admin_headers)
        assert r.status_code == 422, (method, r.text)
    r = await client.get("/user/2147483648", headers=headers)
    assert r.status_code == 422


async def test_a_token_whose_subject_is_out_of_range_is_401(client: httpx.AsyncClient, settings: Settings) -> None:
    now = datetime.now(UTC)
    for sub, jti in (("2147483648", "a"), ("0", "a"), ("1", "j" * 65)):
        claims = {"sub": sub, "iat": now, "exp": now + timedelta(minutes=5), "jti": jti}
        token = jwt.encode(claims, settings.secret_key, algorithm="HS256")
        r = await client.get("/v1/users/me", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 401, (sub, r.text)


async def test_an_oversized_current_password_is_simply_wrong(client: httpx.AsyncClient, users: Users) -> None:
    _, headers = await users.create()
    r = await client.patch(
        "/v1/users/me/password",
        json={"current_password": "x" * 5000, "new_password": "another-password"},
        headers=headers,
    )
    assert r.status_code == 400 and r.json()["detail"] == "Current password is incorrect"


async def test_lone_surrogates_are_refused_like_nul_characters(
    client: httpx.AsyncClient, users: Users, admin_headers: dict[str, str]
) -> None:
    """JSON may carry a lone UTF-16 surrogate (\\ud800); PostgreSQL cannot store it as UTF-8."""
    _, headers = await users.create()
    body = '{"score": 0.5, "predicted_class": "\\ud800", "image_file_name": "a.jpg"}'
    r = await client.post("/feedback/", content=body, headers={**headers, "Content-Type": "application/json"})
    no_outage(r)
    assert r.status_code == 422
    body = '{"email": "sg@example.com", "password": "GoodPassw0rd!", "name": "\\ud800"}'
    r = await client.post("/v1/users", content=body, headers={**admin_headers, "Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "name"]
    r = await client.get("/v1/admin/feedback-export", params={"model": "x", "version": 2**31}, headers=admin_headers)
    assert r.status_code == 422
    r = await client.post("/feedback/", json={"score": "NaN", "predicted_class": "macaw"}, headers=headers)
    assert r.status_code == 422


async def test_a_multipart_login_is_a_login_not_an_upload(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/auth/login", files={"username": (None, "admin@example.com"), "password": (None, "wrong-password")}
    )
    assert r.status_code == 401 and r.json()["detail"] == "Incorrect email or password"


async def test_a_classic_score_is_a_number_as_described(client: httpx.AsyncClient, users: Users) -> None:
    """Lax validation took false as 0.0 and "0.5" as 0.5, where the description says number."""
    _, headers = await users.create()
    for score in (False, True, "0.5"):
        r = await client.post("/feedback/", json={"score": score, "predicted_class": "macaw"}, headers=headers)
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "score"], score
    for number in (1, 0.5):
        r = await client.post("/feedback/", json={"score": number, "predicted_class": "macaw"}, headers=headers)
        assert r.status_code == 201 and r.json()["score"] == number, number


CLASSIC_BODIES = {"ClassicFeedbackCreate"}
"""The classic routes' bodies keep taking what their older clients send."""


def test_every_json_body_refuses_keys_it_does_not_know(app: FastAPI) -> None:
    """Each route's JSON body says so in its schema (``additionalProperties: false``)."""
    spec = app.openapi()
    bodies = {
        content["schema"]["$ref"].rsplit("/", 1)[-1]
        for ops in spec["paths"].values()
        for op in ops.values()
        for media, content in op.get("requestBody", {}).get("content", {}).items()
        if media == "application/json"
    }
    assert {"UserUpdate", "FeedbackCreate", "PredictRequest"} <= bodies
    lax = {name for name in bodies if spec["components"]["schemas"][name].get("additionalProperties") is not False}
    assert lax == CLASSIC_BODIES


async def test_an_unknown_key_or_a_loose_yes_is_422_not_ignored(
    client: httpx.AsyncClient, users: Users, admin_headers: dict[str, str]
) -> None:
    user, headers = await users.create()
    r = await client.patch(f"/v1/users/{user['id']}", json={"password": "a-new-password-1"}, headers=admin_headers)
    assert r.status_code == 422 and "password" in r.text, r.text
    r = await client.patch(f"/v1/users/{user['id']}", json={"is_active": "no"}, headers=admin_headers)
    assert r.status_code == 422, r.text
    assert (await client.get("/v1/users/me", headers=headers)).status_code == 200  # still active
    r = await client.post(
        "/v1/feedback", json={"prediction_id": str(uuid.uuid4()), "is_correct": "yes"}, headers=headers
    )
    assert r.status_code == 422, r.text
    r = await client.post("/v1/predictions", json={"image_id": str(uuid.uuid4()), "wait": True}, headers=headers)
    assert r.status_code == 422 and "wait" in r.text, r.text
