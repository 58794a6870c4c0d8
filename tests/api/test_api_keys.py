"""API keys: made with a login, shown once, used in either header within their scopes, refused once
revoked or expired or when their owner is deactivated, gone with their owner, throttled when wrong,
and stored only as a hash."""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid
from datetime import timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from PIL import Image
from sqlalchemy import func, select, text, update

from api.app.api_keys.models import ApiKey
from api.app.core.config import Settings
from api.app.core.db import utcnow
from contracts.api_keys import DISPLAY_LENGTH, KEY_PREFIX
from tests.conftest import PASSWORD, Users
from tests.conftest import login as log_in
from tests.conftest import no_password_hashes
from tests.images import encode

pytestmark = pytest.mark.usefixtures("client")  # the app's lifespan runs for every test here


def client_at(app: FastAPI, address: str) -> httpx.AsyncClient:
    """A client from an address of its own: the refused keys of one test never throttle another's."""
    transport = httpx.ASGITransport(app=app, client=(address, 1234))

    async def scan(response: httpx.Response) -> None:
        await response.aread()
        no_password_hashes(response)

    return httpx.AsyncClient(transport=transport, base_url="http://test", event_hooks={"response": [scan]})


def fresh_address() -> str:
    return f"10.{os.urandom(1)[0]}.{os.urandom(1)[0]}.{os.urandom(1)[0] or 1}"


async def make_key(client: httpx.AsyncClient, login: dict[str, str], scopes: list[str], **extra: Any) -> dict[str, Any]:
    body = {"name": f"script {uuid.uuid4().hex[:6]}", "scopes": scopes, **extra}
    r = await client.post("/v1/api-keys", json=body, headers=login)
    assert r.status_code == 201, r.text
    created: dict[str, Any] = r.json()
    return created


def unknown_key() -> str:
    return KEY_PREFIX + os.urandom(32).hex()[:43]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def header(key: str) -> dict[str, str]:
    return {"X-API-Key": key}


async def set_key(app: FastAPI, key_id: str, **values: Any) -> None:
    async with app.state.sessionmaker() as session:
        await session.execute(update(ApiKey).where(ApiKey.id == uuid.UUID(key_id)).values(**values))
        await session.commit()


async def listed(client: httpx.AsyncClient, login: dict[str, str], key_id: str) -> dict[str, Any]:
    r = await client.get("/v1/api-keys", headers=login)
    assert r.status_code == 200, r.text
    row: dict[str, Any] = next(k for k in r.json()["data"] if k["id"] == key_id)
    return row


async def test_a_key_is_shown_once_works_in_both_headers_and_stops_when_revoked(app: FastAPI, users: Users) -> None:
    me, login = await users.create()
    async with client_at(app, fresh_address()) as client:
        r = await client.post("/v1/api-keys", json={"name": "nightly", "scopes": ["read"]}, headers=login)
        assert r.status_code == 201, r.text
        assert r.headers["cache-control"] == "no-store"
        created = r.json()
        key = created["key"]
        assert key.startswith(KEY_PREFIX) and len(key) == len(KEY_PREFIX) + 43
        assert created["prefix"] == key[:DISPLAY_LENGTH] and created["scopes"] == ["read"]
        assert created["last_used_at"] is None and created["revoked_at"] is None and created["expires_at"] is None

        # Spaces around the key are no part of it (a header pasted with its trailing space).
        for headers in (bearer(key), header(key), bearer(f" {key} "), header(f" {key} ")):
            r = await client.get("/v1/users/me", headers=headers)
            assert r.status_code == 200, (headers, r.text)
            assert r.json()["id"] == me["id"]

        r = await client.get("/v1/api-keys", headers=login)
        assert r.status_code == 200 and r.json()["count"] == 1
        assert key not in r.text and key[DISPLAY_LENGTH:] not in r.text
        (row,) = r.json()["data"]
        assert "key" not in row and "key_hash" not in row
        assert row["name"] == "nightly" and row["prefix"] == created["prefix"] and row["last_used_at"] is not None

        assert (await client.delete(f"/v1/api-keys/{created['id']}", headers=login)).status_code == 204
        for headers in (bearer(key), header(key)):
            r = await client.get("/v1/users/me", headers=headers)
            assert r.status_code == 401 and r.json()["detail"] == "API key has been revoked"
            assert r.headers["www-authenticate"] == "Bearer"
        assert (await listed(client, login, created["id"]))["revoked_at"] is not None


async def test_last_used_is_written_at_most_once_a_minute(
    client: httpx.AsyncClient, app: FastAPI, users: Users
) -> None:
    _, login = await users.create()
    created = await make_key(client, login, ["read"])
    assert (await client.get("/v1/images", headers=header(created["key"]))).status_code == 200
    first = (await listed(client, login, created["id"]))["last_used_at"]
    assert first is not None
    assert (await client.get("/v1/images", headers=header(created["key"]))).status_code == 200
    assert (await listed(client, login, created["id"]))["last_used_at"] == first
    # A minute later the next use writes it again.
    await set_key(app, created["id"], last_used_at=utcnow() - timedelta(seconds=61))
    assert (await client.get("/v1/images", headers=header(created["key"]))).status_code == 200
    assert (await listed(client, login, created["id"]))["last_used_at"] > first


async def test_an_expired_key_is_refused(app: FastAPI, users: Users) -> None:
    _, login = await users.create()
    async with client_at(app, fresh_address()) as client:
        created = await make_key(client, login, ["read"], expires_in_days=30)
        expires = created["expires_at"]
        assert expires is not None
        assert (await client.get("/v1/users/me", headers=bearer(created["key"]))).status_code == 200
        await set_key(app, created["id"], expires_at=utcnow() - timedelta(seconds=1))
        r = await client.get("/v1/users/me", headers=bearer(created["key"]))
        assert r.status_code == 401 and r.json()["detail"] == "API key has expired"


@pytest.mark.parametrize(
    "body",
    [
        {"name": "", "scopes": ["read"]},
        {"name": "   ", "scopes": ["read"]},
        # Invisible: zero-width spaces, a byte order mark, a soft hyphen (listed as a blank name).
        {"name": "\u200b\u200b", "scopes": ["read"]},
        {"name": "\ufeff", "scopes": ["read"]},
        {"name": "\u00ad", "scopes": ["read"]},
        {"name": "x" * 101, "scopes": ["read"]},
        # Over the described maxLength as sent, even if trimming would bring it under.
        {"name": "\t" + "x" * 100, "scopes": ["read"]},
        {"name": "ok", "scopes": []},
        {"name": "ok", "scopes": ["write"]},
        {"name": "ok"},
        {"name": "ok", "scopes": ["read"], "expires_in_days": 0},
        {"name": "ok", "scopes": ["read"], "expires_in_days": 366},
        {"name": "ok", "scopes": ["read"], "expires_in_days": True},
        {"name": "ok", "scopes": ["read"], "expires_in_days": "30"},
    ],
)
async def test_invalid_requests_for_a_key_are_422(client: httpx.AsyncClient, users: Users, body: Any) -> None:
    _, login = await users.create()
    r = await client.post("/v1/api-keys", json=body, headers=login)
    assert r.status_code == 422, r.text


async def test_scopes_limit_what_a_key_may_do(client: httpx.AsyncClient, users: Users) -> None:
    _, login = await users.create()
    reader = (await make_key(client, login, ["read"]))["key"]
    predictor = (await make_key(client, login, ["predict"]))["key"]
    photo = encode(Image.frombytes("RGB", (24, 24), os.urandom(24 * 24 * 3)), "PNG")

    # read: GET only.
    assert (await client.get("/v1/images", headers=header(reader))).status_code == 200
    r = await client.post("/v1/images", files={"file": ("a.png", photo)}, headers=header(reader))
    assert r.status_code == 403 and r.json()["detail"] == "This API key lacks the predict scope"
    # predict: uploads (through the upload's own checks, before its body is read) and predictions, no reading.
    r = await client.post("/v1/images", files={"file": ("a.png", photo)}, headers=bearer(predictor))
    assert r.status_code == 201, r.text
    image_id = r.json()["id"]
    r = await client.get(f"/v1/images/{image_id}", headers=bearer(predictor))
    assert r.status_code == 403 and r.json()["detail"] == "This API key lacks the read scope"
    assert (await client.get(f"/v1/images/{image_id}", headers=bearer(reader))).status_code == 200
    assert (await client.delete(f"/v1/images/{image_id}", headers=header(reader))).status_code == 403
    assert (await client.delete(f"/v1/images/{image_id}", headers=header(predictor))).status_code == 204
    # An upload with something that is not a key's shape is refused before its body is read.
    r = await client.post("/v1/images", files={"file": ("a.png", photo)}, headers=header("ipk_short"))
    assert r.status_code == 401


async def test_admin_routes_need_the_admin_scope(client: httpx.AsyncClient, users: Users) -> None:
    _, admin_login = await users.create(role="admin")
    everything_but_admin = (await make_key(client, admin_login, ["read", "predict"]))["key"]
    admin_key = (await make_key(client, admin_login, ["admin"]))["key"]
    admin_and_read = (await make_key(client, admin_login, ["admin", "read"]))["key"]

    for path in ("/v1/admin/stats", "/v1/users"):
        r = await client.get(path, headers=header(everything_but_admin))
        assert r.status_code == 403 and r.json()["detail"] == "This API key lacks the admin scope", path
        assert (await client.get(path, headers=header(admin_key))).status_code == 200, path
    # An admin's key without the admin scope acts as a user's within the user routes too.
    r = await client.get("/v1/feedback", params={"all_users": True}, headers=header(everything_but_admin))
    assert r.status_code == 403
    assert (await client.get("/v1/feedback", params={"all_users": True}, headers=header(admin_and_read))).is_success
    # The admin scope alone does not read the user routes.
    assert (await client.get("/v1/users/me", headers=header(admin_key))).status_code == 403

    # A user's key with every scope it can have stays out of the admin routes.
    _, login = await users.create()
    user_key = (await make_key(client, login, ["read", "predict"]))["key"]
    assert (await client.get("/v1/admin/stats", headers=bearer(user_key))).status_code == 403


async def test_only_admins_make_admin_keys(client: httpx.AsyncClient, users: Users) -> None:
    _, login = await users.create()
    r = await client.post("/v1/api-keys", json={"name": "ops", "scopes": ["read", "admin"]}, headers=login)
    assert r.status_code == 403 and "admin scope" in r.json()["detail"]
    assert (await client.get("/v1/api-keys", headers=login)).json()["count"] == 0
    _, admin_login = await users.create(role="admin")
    created = await make_key(client, admin_login, ["admin", "read", "admin"])
    assert created["scopes"] == ["read", "admin"]


async def test_a_demoted_admins_keys_do_not_act_as_admin_after_a_new_promotion(
    client: httpx.AsyncClient, users: Users, admin_headers: dict[str, str]
) -> None:
    """A key with the admin scope acts as an admin's only while its owner is one; made before its
    owner was last made an admin, it stays a user's key (its admin scope is void), while a key made
    after the promotion has it."""
    person, login = await users.create(role="admin")
    old_key = (await make_key(client, login, ["read", "admin"]))["key"]
    assert (await client.get("/v1/users", headers=header(old_key))).status_code == 200

    demote = await client.patch(f"/v1/users/{person['id']}", json={"role": "user"}, headers=admin_headers)
    assert demote.status_code == 200, demote.text
    assert (await client.get("/v1/users", headers=header(old_key))).status_code == 403
    current = await client.get("/v1/api-keys/current", headers=header(old_key))
    assert current.status_code == 200 and current.json()["scopes"] == ["read"], current.text  # while demoted
    listed = (await client.get("/v1/api-keys", headers=login)).json()["data"]
    assert [k["scopes"] for k in listed] == [["read"]], listed
    promote = await client.patch(f"/v1/users/{person['id']}", json={"role": "admin"}, headers=admin_headers)
    assert promote.status_code == 200, promote.text
    r = await client.get("/v1/users", headers=header(old_key))
    assert r.status_code == 403 and r.json()["detail"] == "This API key lacks the admin scope", r.text
    # It reads as the user's key it now is, and says which scopes it grants.
    assert (await client.get("/v1/users/me", headers=header(old_key))).status_code == 200
    current = await client.get("/v1/api-keys/current", headers=header(old_key))
    assert current.status_code == 200 and current.json()["scopes"] == ["read"], current.text
    listed = (await client.get("/v1/api-keys", headers=login)).json()["data"]
    assert [k["scopes"] for k in listed] == [["read"]], listed
    # Saying the role again (no change) does not void the keys made since.
    new_key = (await make_key(client, login, ["admin"]))["key"]
    again = await client.patch(f"/v1/users/{person['id']}", json={"role": "admin"}, headers=admin_headers)
    assert again.status_code == 200, again.text
    assert (await client.get("/v1/users", headers=header(new_key))).status_code == 200


async def test_a_key_reads_its_own_scopes_whatever_they_are(client: httpx.AsyncClient, users: Users) -> None:
    """``GET /v1/api-keys/current`` answers for the key that sends it, even without the read scope
    (a script checks before it sends), and 404 for a login token; it never shows the key."""
    _, login = await users.create()
    made = await make_key(client, login, ["predict"])
    r = await client.get("/v1/api-keys/current", headers=bearer(made["key"]))
    assert r.status_code == 200, r.text
    assert r.json()["id"] == made["id"] and r.json()["scopes"] == ["predict"] and "key" not in r.json()
    assert made["key"] not in r.text
    r = await client.get("/v1/api-keys/current", headers=login)
    assert r.status_code == 404 and "not made with an API key" in r.json()["detail"]
    assert (await client.get("/v1/api-keys/current")).status_code == 401
    assert (await client.delete(f"/v1/api-keys/{made['id']}", headers=login)).status_code == 204
    assert (await client.get("/v1/api-keys/current", headers=header(made["key"]))).status_code == 401


async def test_a_key_cannot_manage_keys_or_become_a_login(client: httpx.AsyncClient, users: Users) -> None:
    """Only a login token manages keys, changes the password or renews a session: a key never
    gives itself a successor, more scopes or a login token."""
    _, login = await users.create()
    created = await make_key(client, login, ["read", "predict"])
    for headers in (bearer(created["key"]), header(created["key"])):
        attempts = [
            client.post("/v1/api-keys", json={"name": "child", "scopes": ["read"]}, headers=headers),
            client.get("/v1/api-keys", headers=headers),
            client.delete(f"/v1/api-keys/{created['id']}", headers=headers),
            client.post("/v1/auth/refresh", headers=headers),
            client.post("/v1/auth/logout", headers=headers),
            client.patch(
                "/v1/users/me/password",
                json={"current_password": PASSWORD, "new_password": "another-password"},
                headers=headers,
            ),
        ]
        for attempt in attempts:
            r = await attempt
            assert r.status_code == 403, (r.request.method, r.request.url, r.text)
    assert (await listed(client, login, created["id"]))["revoked_at"] is None
    assert (await client.get("/v1/api-keys", headers=login)).json()["count"] == 1
    assert (await client.get("/v1/users/me", headers=header(created["key"]))).status_code == 200


async def test_an_admin_key_cannot_manage_accounts(
    client: httpx.AsyncClient, users: Users, admin_headers: dict[str, str]
) -> None:
    """Creating, changing and deleting accounts needs an admin's login token: with an ``admin``
    key, a leaked key made an admin account with a password of its choosing (or promoted one it
    held) and logged in as it, a login token with every right. The key still reads the users."""
    _, admin_login = await users.create(role="admin")
    other, _ = await users.create()
    key = (await make_key(client, admin_login, ["admin", "read"]))["key"]
    for headers in (bearer(key), header(key)):
        attempts = [
            client.post(
                "/v1/users",
                json={"email": "shadow@example.com", "password": PASSWORD, "role": "admin"},
                headers=headers,
            ),
            client.post("/user/", json={"email": "shadow@example.com", "password": PASSWORD}, headers=headers),
            client.patch(f"/v1/users/{other['id']}", json={"role": "admin"}, headers=headers),
            client.patch(f"/v1/users/{other['id']}", json={"is_active": False}, headers=headers),
            client.delete(f"/v1/users/{other['id']}", headers=headers),
            client.delete(f"/user/{other['id']}", headers=headers),
        ]
        for attempt in attempts:
            r = await attempt
            assert r.status_code == 403, (r.request.method, r.request.url, r.text)
        assert (await client.get("/v1/users", headers=headers)).status_code == 200
    r = await client.get(f"/v1/users/{other['id']}", headers=admin_headers)
    assert r.json()["role"] == "user" and r.json()["is_active"] is True, r.text
    r = await client.patch(f"/v1/users/{other['id']}", json={"name": "Renamed"}, headers=admin_login)
    assert r.status_code == 200, r.text


async def test_someone_elses_key_is_not_found(client: httpx.AsyncClient, users: Users) -> None:
    _, alice = await users.create()
    _, bob = await users.create()
    created = await make_key(client, alice, ["read"])
    assert (await client.delete(f"/v1/api-keys/{created['id']}", headers=bob)).status_code == 404
    assert (await client.delete(f"/v1/api-keys/{uuid.uuid4()}", headers=bob)).status_code == 404
    assert (await client.get("/v1/api-keys", headers=bob)).json()["count"] == 0
    assert (await client.get("/v1/users/me", headers=header(created["key"]))).status_code == 200


async def test_deactivating_the_owner_stops_its_keys_and_deleting_removes_them(
    app: FastAPI, users: Users, admin_headers: dict[str, str]
) -> None:
    user, login = await users.create()
    async with client_at(app, fresh_address()) as client:
        key = (await make_key(client, login, ["read"]))["key"]
        assert (await client.get("/v1/users/me", headers=header(key))).status_code == 200
        r = await client.patch(f"/v1/users/{user['id']}", json={"is_active": False}, headers=admin_headers)
        assert r.status_code == 200
        assert (await client.get("/v1/users/me", headers=header(key))).status_code == 401
        r = await client.patch(f"/v1/users/{user['id']}", json={"is_active": True}, headers=admin_headers)
        assert r.status_code == 200
        # Reactivated, the account gets none of its keys back (nor its login sessions): an admin
        # who deactivated a compromised account need not revoke each key too.
        r = await client.get("/v1/users/me", headers=header(key))
        assert r.status_code == 401 and "before its account was deactivated" in r.json()["detail"], r.text
        again = await log_in(client, user["email"], PASSWORD)
        listed = (await client.get("/v1/api-keys", headers=again)).json()["data"]
        assert [k["revoked_at"] is not None for k in listed] == [True], listed
        fresh = (await make_key(client, again, ["read"]))["key"]
        assert (await client.get("/v1/users/me", headers=header(fresh))).status_code == 200
        listed = (await client.get("/v1/api-keys", headers=again)).json()["data"]
        assert [k["revoked_at"] is not None for k in listed] == [False, True], listed

        assert (await client.delete(f"/v1/users/{user['id']}", headers=admin_headers)).status_code == 204
        assert (await client.get("/v1/users/me", headers=bearer(key))).status_code == 401
    async with app.state.sessionmaker() as session:
        left = await session.scalar(select(func.count()).select_from(ApiKey).where(ApiKey.owner_id == user["id"]))
    assert left == 0


async def test_wrong_keys_are_throttled_per_client_address(app: FastAPI, users: Users) -> None:
    _, login = await users.create()
    address = fresh_address()
    async with client_at(app, address) as client:
        good = (await make_key(client, login, ["read"]))["key"]
        wrong = [header(unknown_key()), bearer(unknown_key()), header("not-a-key"), header(unknown_key()[:-1])]
        for i in range(20):
            r = await client.get("/v1/users/me", headers=wrong[i % len(wrong)])
            assert r.status_code == 401, (i, r.text)
        r = await client.get("/v1/users/me", headers=header(unknown_key()))
        assert r.status_code == 429 and 0 < int(r.headers["retry-after"]) <= 900
        # Past the limit that address's keys wait, the right one too; its login tokens do not.
        assert (await client.get("/v1/users/me", headers=header(good))).status_code == 429
        assert (await client.get("/v1/users/me", headers=login)).status_code == 200
    async with client_at(app, fresh_address()) as other:
        assert (await other.get("/v1/users/me", headers=header(good))).status_code == 200


async def test_parallel_wrong_keys_cannot_race_the_address_count(app: FastAPI, settings: Settings) -> None:
    """Wrong keys sent at once from one address: exactly LOGIN_MAX_FAILURES_PER_CLIENT are
    answered 401, the rest 429; checked against a count read before any failure was added, all
    were 401."""
    limit = settings.login_max_failures_per_client
    async with client_at(app, fresh_address()) as client:
        responses = await asyncio.gather(
            *(client.get("/v1/users/me", headers=header(unknown_key())) for _ in range(limit + 10))
        )
    codes = sorted(r.status_code for r in responses)
    assert codes == [401] * limit + [429] * 10
    assert all(0 < int(r.headers["retry-after"]) <= 900 for r in responses if r.status_code == 429)


async def test_a_revoked_key_sent_on_is_no_guess_and_locks_no_key_out(
    app: FastAPI, users: Users, admin_headers: dict[str, str]
) -> None:
    """A script still sending a key after its rotation counted as guessing: after 20 requests
    every key from its host got 429 for 15 minutes, the new one too."""
    _, login = await users.create()
    async with client_at(app, fresh_address()) as client:
        old = await make_key(client, login, ["read"])
        new = (await make_key(client, login, ["read"]))["key"]
        assert (await client.delete(f"/v1/api-keys/{old['id']}", headers=login)).status_code == 204
        for _ in range(25):
            r = await client.get("/v1/users/me", headers=header(old["key"]))
            assert r.status_code == 401 and r.json()["detail"] == "API key has been revoked", r.text
        assert (await client.get("/v1/users/me", headers=header(new))).status_code == 200
    # Nor a deactivated owner's key (401 saying the account is deactivated).
    gone, gone_login = await users.create()
    async with client_at(app, fresh_address()) as client:
        kept = (await make_key(client, gone_login, ["read"]))["key"]
        working = (await make_key(client, login, ["read"]))["key"]
        r = await client.patch(f"/v1/users/{gone['id']}", json={"is_active": False}, headers=admin_headers)
        assert r.status_code == 200, r.text
        for _ in range(25):
            r = await client.get("/v1/users/me", headers=header(kept))
            assert r.status_code == 401 and "deactivated" in r.json()["detail"], r.text
        assert (await client.get("/v1/users/me", headers=header(working))).status_code == 200


async def test_only_the_keys_hash_is_stored(client: httpx.AsyncClient, app: FastAPI, users: Users) -> None:
    _, login = await users.create()
    created = await make_key(client, login, ["read", "predict"])
    key = created["key"]
    async with app.state.sessionmaker() as session:
        rows = list(await session.scalars(text("SELECT row_to_json(k)::text FROM api_keys AS k")))
        stored = await session.scalar(select(ApiKey.key_hash).where(ApiKey.id == uuid.UUID(created["id"])))
    assert rows and not [row for row in rows if key in row or key[DISPLAY_LENGTH:] in row]
    assert stored == hashlib.sha256(key.encode()).hexdigest()


async def test_openapi_offers_the_key_header_beside_the_login(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    scheme = spec["components"]["securitySchemes"]["APIKey"]
    assert scheme == {**scheme, "type": "apiKey", "in": "header", "name": "X-API-Key"}
    both: list[dict[str, list[str]]] = [{"OAuth2PasswordBearer": []}, {"APIKey": []}]
    assert spec["paths"]["/v1/images"]["post"]["security"] == both
    assert spec["paths"]["/v1/admin/stats"]["get"]["security"] == both
    # Keys are managed with a login only.
    for method in ("get", "post"):
        assert spec["paths"]["/v1/api-keys"][method]["security"] == [{"OAuth2PasswordBearer": []}]
    assert {"201", "401", "403", "422"} <= set(spec["paths"]["/v1/api-keys"]["post"]["responses"])
    assert {"401", "403", "429"} <= set(spec["paths"]["/v1/images"]["get"]["responses"])


async def test_a_keys_name_is_stored_trimmed(client: httpx.AsyncClient, users: Users) -> None:
    _, login = await users.create()
    r = await client.post("/v1/api-keys", json={"name": "\t nightly \n", "scopes": ["read"]}, headers=login)
    assert r.status_code == 201 and r.json()["name"] == "nightly", r.text


@pytest.mark.parametrize(
    "name", ["invoice\u202egnp.exe", "nightly\nadmin", "a\tb", "bell\x07", "csi\x9b", "a\u2028b", "a\u2029b"]
)
async def test_a_keys_name_with_control_or_direction_characters_is_refused(
    client: httpx.AsyncClient, users: Users, name: str
) -> None:
    """Shown in tables and logs, such a name could break a line or pass for another."""
    _, login = await users.create()
    r = await client.post("/v1/api-keys", json={"name": name, "scopes": ["read"]}, headers=login)
    assert r.status_code == 422 and "control characters" in r.text, r.text
    r = await client.post("/v1/api-keys", json={"name": "Zoë's 🚀 script (مرحبا)", "scopes": ["read"]}, headers=login)
    assert r.status_code == 201, r.text


async def test_a_login_token_sent_as_a_key_is_told_where_it_goes_and_not_counted(app: FastAPI, users: Users) -> None:
    """A login token in X-API-Key (a client set up for keys given a token) is 401 saying where
    a token goes, on user routes and on those that need a login alike, and never counts as a
    failed key: the address's real keys are not locked out by it."""
    _, login = await users.create()
    token = login["Authorization"].removeprefix("Bearer ")
    async with client_at(app, fresh_address()) as client:
        key = (await make_key(client, login, ["read"]))["key"]
        for path in ("/v1/users/me", "/v1/api-keys", "/v1/users/me", "/v1/api-keys") * 6:
            r = await client.get(path, headers=header(token))
            assert r.status_code == 401 and "Authorization: Bearer" in r.json()["detail"], (path, r.text)
        assert (await client.get("/v1/users/me", headers=header(key))).status_code == 200


async def test_pages_of_keys_made_at_one_instant_list_each_once(
    client: httpx.AsyncClient, app: FastAPI, users: Users
) -> None:
    """Keys made at the same instant (a script making many in one transaction) are ordered by id
    as well: following ``skip`` lists each once, where ties in time alone came back in any order."""
    me, login = await users.create()
    async with app.state.sessionmaker() as session:
        await session.execute(
            text(
                "INSERT INTO api_keys (id, owner_id, name, prefix, key_hash, scopes, created_at)"
                " SELECT gen_random_uuid(), :owner, 'k' || g, 'pk_x', encode(sha256(gen_random_uuid()::text::bytea), 'hex'),"
                " ARRAY['read'], now() FROM generate_series(1, 300) g"
            ),
            {"owner": me["id"]},
        )
        await session.commit()
    seen: list[str] = []
    for skip in range(0, 300, 20):
        r = await client.get("/v1/api-keys", params={"skip": skip, "limit": 20}, headers=login)
        assert r.status_code == 200, r.text
        seen += [row["id"] for row in r.json()["data"]]
    assert len(seen) == len(set(seen)) == 300
