"""Users, roles, the first admin, the CLI, settings safety and the OpenAPI contract."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, HTTPException
from PIL import Image
from pydantic import ValidationError

from api.app.core.config import Settings
from api.prestart import seed_admin
from tests.conftest import ADMIN_EMAIL, PASSWORD, Users, login
from tests.images import encode
from tests.support import ROOT


async def test_admin_lists_users_classic_and_paginated(
    client: httpx.AsyncClient, users: Users, admin_headers: dict[str, str]
) -> None:
    for _ in range(3):
        await users.create()
    classic = await client.get("/user/", headers=admin_headers)
    assert classic.status_code == 200 and isinstance(classic.json(), list)
    page = await client.get("/v1/users", params={"skip": 1, "limit": 2}, headers=admin_headers)
    body = page.json()
    assert page.status_code == 200 and len(body["data"]) == 2 and body["count"] >= 4
    assert body["data"][0]["id"] == classic.json()[1]["id"]


async def test_non_admins_are_forbidden_admin_routes(client: httpx.AsyncClient, users: Users) -> None:
    other, _ = await users.create()
    _, headers = await users.create()
    requests: tuple[tuple[str, str, dict[str, Any]], ...] = (
        ("GET", "/user/", {}),
        ("GET", "/v1/users", {}),
        ("POST", "/user/", {"json": {"email": "x@example.com", "password": PASSWORD}}),
        ("POST", "/v1/users", {"json": {"email": "x@example.com", "password": PASSWORD}}),
        ("PATCH", f"/v1/users/{other['id']}", {"json": {"role": "admin"}}),
        ("DELETE", f"/user/{other['id']}", {}),
        ("DELETE", f"/v1/users/{other['id']}", {}),
    )
    for method, path, kwargs in requests:
        r = await client.request(method, path, headers=headers, **kwargs)
        assert r.status_code == 403, (method, path, r.text)


async def test_create_user_conflict_and_password_policy(
    client: httpx.AsyncClient, admin_headers: dict[str, str], settings: Settings
) -> None:
    email = f"new-{uuid.uuid4().hex[:8]}@example.com"
    r = await client.post("/user/", json={"email": email, "password": PASSWORD, "name": "N"}, headers=admin_headers)
    assert r.status_code == 201 and r.json()["email"] == email and r.json()["role"] == "user"
    r = await client.post("/v1/users", json={"email": email.upper(), "password": PASSWORD}, headers=admin_headers)
    assert r.status_code == 409
    short = await client.post("/v1/users", json={"email": "s" + email, "password": "short"}, headers=admin_headers)
    assert short.status_code == 422 and "at least" in short.json()["detail"]
    long = "x" * (settings.password_max_length + 1)
    r = await client.post("/v1/users", json={"email": "l" + email, "password": long}, headers=admin_headers)
    assert r.status_code == 422 and "at most" in r.json()["detail"]
    r = await client.post("/v1/users", json={"email": "not-an-email", "password": PASSWORD}, headers=admin_headers)
    assert r.status_code == 422


async def test_read_user_self_or_admin_else_404(
    client: httpx.AsyncClient, users: Users, admin_headers: dict[str, str]
) -> None:
    me, headers = await users.create()
    other, _ = await users.create()
    assert (await client.get(f"/user/{me['id']}", headers=headers)).status_code == 200
    assert (await client.get(f"/user/{other['id']}", headers=headers)).status_code == 404
    assert (await client.get(f"/user/{other['id']}", headers=admin_headers)).status_code == 200
    assert (await client.get("/v1/users/me", headers=headers)).json()["id"] == me["id"]
    assert (await client.get("/user/987654", headers=admin_headers)).status_code == 404
    assert (await client.delete("/v1/users/987654", headers=admin_headers)).status_code == 404
    assert (await client.patch("/v1/users/987654", json={"name": "x"}, headers=admin_headers)).status_code == 404


async def test_admin_changes_role_and_name(
    client: httpx.AsyncClient, users: Users, admin_headers: dict[str, str]
) -> None:
    user, headers = await users.create()
    r = await client.patch(f"/v1/users/{user['id']}", json={"role": "admin", "name": "Boss"}, headers=admin_headers)
    assert r.status_code == 200 and r.json()["role"] == "admin" and r.json()["name"] == "Boss"
    assert (await client.get("/v1/users", headers=headers)).status_code == 200


async def test_a_users_name_with_control_or_direction_characters_is_refused(
    client: httpx.AsyncClient, users: Users, admin_headers: dict[str, str]
) -> None:
    """On creation and on a change: 422 naming the rule; letters of any script pass."""
    user, _ = await users.create()
    for name in ("Mallory\u202e", "two\nlines", "\u2066isolate\u2069"):
        r = await client.patch(f"/v1/users/{user['id']}", json={"name": name}, headers=admin_headers)
        assert r.status_code == 422 and "control characters" in r.text, r.text
        r = await client.post(
            "/v1/users",
            json={"email": f"n{len(name)}@example.com", "password": "a-good-password", "name": name},
            headers=admin_headers,
        )
        assert r.status_code == 422, r.text
    r = await client.patch(f"/v1/users/{user['id']}", json={"name": "Zoë Ñúñez 李"}, headers=admin_headers)
    assert r.status_code == 200 and r.json()["name"] == "Zoë Ñúñez 李", r.text


async def test_change_password_needs_current_one(client: httpx.AsyncClient, users: Users) -> None:
    user, headers = await users.create()
    r = await client.patch(
        "/v1/users/me/password",
        json={"current_password": "wrong-one!", "new_password": "another-password"},
        headers=headers,
    )
    assert r.status_code == 400
    r = await client.patch(
        "/v1/users/me/password", json={"current_password": PASSWORD, "new_password": "short"}, headers=headers
    )
    assert r.status_code == 422
    r = await client.patch(
        "/v1/users/me/password",
        json={"current_password": PASSWORD, "new_password": "another-password"},
        headers=headers,
    )
    assert r.status_code == 204
    await login(client, str(user["email"]), "another-password")


async def test_old_hashes_are_upgraded_on_login(client: httpx.AsyncClient, app: FastAPI, users: Users) -> None:
    from passlib.context import CryptContext
    from sqlalchemy import select

    from api.app.users.models import User

    user, _ = await users.create()
    weak = CryptContext(schemes=["argon2"], argon2__memory_cost=8192, argon2__rounds=1).hash(PASSWORD)
    async with app.state.sessionmaker() as session:
        row = await session.scalar(select(User).where(User.id == user["id"]))
        row.hashed_password = weak
        await session.commit()
    await login(client, str(user["email"]), PASSWORD)
    async with app.state.sessionmaker() as session:
        upgraded = await session.scalar(select(User.hashed_password).where(User.id == user["id"]))
    assert upgraded != weak and "m=19456,t=2,p=1" in upgraded


async def test_first_admin_is_idempotent(settings: Settings) -> None:
    assert await seed_admin(settings) is False


def test_cli_creates_users(settings: Settings) -> None:
    email = f"cli-{uuid.uuid4().hex[:8]}@example.com"
    env = {"DATABASE_URL": settings.database_url, "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, "-m", "api.cli", "create-user", email, "--password", PASSWORD, "--admin"]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert email in done.stdout
    again = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "already exists" in again.stderr
    weak_cmd = [sys.executable, "-m", "api.cli", "create-user", "x" + email, "--password", "short"]
    weak = subprocess.run(weak_cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert weak.returncode == 1 and "at least" in weak.stderr


def test_settings_refuse_insecure_defaults_outside_development() -> None:
    with pytest.raises(ValidationError, match="SECRET_KEY"):
        Settings(_env_file=None, environment="production")  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="FIRST_ADMIN_PASSWORD"):
        Settings(_env_file=None, environment="production", secret_key="k" * 40)  # type: ignore[call-arg]
    Settings(_env_file=None, environment="production", secret_key="k" * 40, first_admin_password="long-enough-pw")  # type: ignore[call-arg]
    assert Settings(_env_file=None).first_admin_password == "admin"  # type: ignore[call-arg]


def test_every_setting_is_documented() -> None:
    from model.config import ModelSettings
    from ui.config import UISettings

    for cls in (Settings, ModelSettings, UISettings):
        for name, field in cls.model_fields.items():
            assert field.description, f"{cls.__name__}.{name} has no description"


LOGIN_ONLY = {"/v1/auth/refresh", "/v1/auth/logout", "/v1/users/me/password"}
ACCOUNTS = {
    ("/v1/users", "post"),
    ("/user/", "post"),
    ("/v1/users/{user_id}", "patch"),
    ("/v1/users/{user_id}", "delete"),
    ("/user/{user_id}", "delete"),
}
"""Managing accounts: an admin's login token only."""


async def test_openapi_locks_and_status_codes(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    scheme = spec["components"]["securitySchemes"]["OAuth2PasswordBearer"]
    assert scheme["flows"]["password"]["tokenUrl"] == "/v1/auth/login"
    public = {
        ("/login", "post"),
        ("/v1/auth/login", "post"),
        ("/v1/auth/signup", "post"),
        ("/health/live", "get"),
        ("/health/ready", "get"),
        ("/health/live", "head"),
        ("/health/ready", "head"),
    }
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            codes = set(op["responses"])
            assert "503" in codes, (path, method)
            if (path, method) in public:
                continue
            # A login token or an API key, except where only a login will do (managing keys, the
            # password, the login session).
            login_only = (
                (path.startswith("/v1/api-keys") and path != "/v1/api-keys/current")
                or path in LOGIN_ONLY
                or (path, method) in ACCOUNTS
            )
            accepted: list[dict[str, list[str]]] = (
                [{"OAuth2PasswordBearer": []}] if login_only else [{"OAuth2PasswordBearer": []}, {"APIKey": []}]
            )
            assert op.get("security") == accepted, (path, method)
            assert "401" in codes, (path, method)
            assert op.get("summary"), (path, method)
    assert "429" in spec["paths"]["/login"]["post"]["responses"]
    assert "403" in spec["paths"]["/user/"]["get"]["responses"]
    assert "404" in spec["paths"]["/v1/images/{image_id}"]["get"]["responses"]
    assert {"413", "415", "422", "503", "504"} <= set(spec["paths"]["/model/predict"]["post"]["responses"])
    docs = await client.get("/docs")
    assert docs.status_code == 200 and "swagger-ui" in docs.text


def _ref(response: dict[str, Any]) -> str:
    return str(response["content"]["application/json"]["schema"]["$ref"]).rsplit("/", 1)[-1]


async def test_openapi_describes_the_errors_as_sent(client: httpx.AsyncClient) -> None:
    """A 422 is FastAPI's list or a service's message, never only one of them; what the middleware
    answers before a route (413, 500) and a body that cannot be parsed (400) are described too."""
    spec = (await client.get("/openapi.json")).json()
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            responses = op["responses"]
            if "422" in responses:
                assert _ref(responses["422"]) == "InvalidOut", (path, method)
            if op.get("parameters") or "requestBody" in op:
                assert "422" in responses, (path, method)
            if "requestBody" in op:
                assert {"400", "413"} <= set(responses), (path, method)
            if method in ("post", "patch"):
                assert "413" in responses, (path, method)
            assert _ref(responses["500"]) == "ServerErrorOut", (path, method)
            if path != "/health/ready":
                assert responses["503"]["headers"]["Retry-After"]["required"], (path, method)
            for status in ("401", "429"):
                if status in responses:
                    assert responses[status]["headers"], (path, method, status)


async def test_first_admin_can_use_swagger_password_flow(client: httpx.AsyncClient) -> None:
    """What the Authorize button sends: the OAuth2 password form, then a bearer header."""
    from tests.conftest import ADMIN_PASSWORD

    r = await client.post(
        "/v1/auth/login",
        data={"grant_type": "password", "username": ADMIN_EMAIL, "password": ADMIN_PASSWORD, "scope": ""},
    )
    token = r.json()["access_token"]
    assert (await client.get("/user/", headers={"Authorization": f"Bearer {token}"})).status_code == 200


async def test_an_admin_cannot_demote_deactivate_or_delete_themselves(client: httpx.AsyncClient, users: Users) -> None:
    admin, headers = await users.create(role="admin")
    for method, body in (("PATCH", {"role": "user"}), ("PATCH", {"is_active": False}), ("DELETE", None)):
        r = await client.request(method, f"/v1/users/{admin['id']}", json=body, headers=headers)
        assert r.status_code == 409 and "yourself" in r.json()["detail"], (method, body, r.text)
    me = (await client.get("/v1/users/me", headers=headers)).json()
    assert me["role"] == "admin" and me["is_active"] is True
    renamed = await client.patch(f"/v1/users/{admin['id']}", json={"name": "Still admin"}, headers=headers)
    assert renamed.status_code == 200


async def test_the_last_active_admin_keeps_their_rights(app: FastAPI, users: Users) -> None:
    """Two admins demoting each other: the rows are locked, and the second finds it is no longer
    an admin, so the first stays one."""
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import AsyncSession

    from api.app.users import service
    from api.app.users.models import Role, User
    from api.app.users.schemas import UserUpdate

    a, _ = await users.create(role="admin")
    b, _ = await users.create(role="admin")
    # The service commits; inside an outer transaction its commits only release savepoints, and
    # everything, the other admins' deactivation included, is rolled back at the end.
    async with app.state.engine.connect() as conn:
        outer = await conn.begin()
        session = AsyncSession(bind=conn, join_transaction_mode="create_savepoint", expire_on_commit=False)
        try:
            await session.execute(
                text("UPDATE users SET is_active = false WHERE role = 'admin' AND id NOT IN (:a, :b)"),
                {"a": a["id"], "b": b["id"]},
            )
            actor_a, actor_b = await session.get(User, a["id"]), await session.get(User, b["id"])
            assert actor_a is not None and actor_b is not None
            demote = UserUpdate(role=Role.user)
            await service.update_user(session=session, actor=actor_a, user=actor_b, changes=demote)
            with pytest.raises(HTTPException) as refused:
                await service.update_user(session=session, actor=actor_b, user=actor_a, changes=demote)
            assert refused.value.status_code == 403 and "no longer an active admin" in refused.value.detail
        finally:
            await session.close()
            await outer.rollback()


async def test_removing_an_admin_holds_other_admins_changes_but_not_their_logins(
    app: FastAPI, client: httpx.AsyncClient, users: Users
) -> None:
    """While one admin's demotion (or deletion, the same check) of another is uncommitted, a
    second removal waits for it and then finds its actor gone, but the admins log in meanwhile: the
    removal held every active admin's row, which a login reads FOR SHARE, so deleting an admin
    with a long history held every admin's login to its end."""
    from sqlalchemy.ext.asyncio import AsyncSession

    from api.app.users import service
    from api.app.users.models import Role, User
    from api.app.users.schemas import UserUpdate

    a, _ = await users.create(role="admin")
    b, _ = await users.create(role="admin")
    c, _ = await users.create(role="admin")
    async with (
        AsyncSession(app.state.engine, expire_on_commit=False) as first,
        AsyncSession(app.state.engine, expire_on_commit=False) as second,
    ):
        actor_a, target_b = await first.get(User, a["id"]), await first.get(User, b["id"])
        assert actor_a is not None and target_b is not None
        await service._keep_an_admin(session=first, actor=actor_a, target=target_b, action="demote")
        target_b.role = Role.user.value
        await first.flush()
        # The actor and an admin apart from it (the target's own login waits: its row is written).
        for email in (a["email"], c["email"]):
            await asyncio.wait_for(login(client, email, PASSWORD), timeout=10)

        async def b_demotes_a() -> None:
            actor_b, target_a = await second.get(User, b["id"]), await second.get(User, a["id"])
            assert actor_b is not None and target_a is not None
            await service.update_user(session=second, actor=actor_b, user=target_a, changes=UserUpdate(role=Role.user))

        demote_a = asyncio.create_task(b_demotes_a())
        await asyncio.sleep(1.0)
        assert not demote_a.done(), "a second removal ran beside an uncommitted one"
        await first.commit()
        with pytest.raises(HTTPException) as refused:
            await asyncio.wait_for(demote_a, timeout=10)
        assert refused.value.status_code == 403 and "no longer an active admin" in refused.value.detail
    me = (await client.get("/v1/users/me", headers=await login(client, a["email"], PASSWORD))).json()
    assert me["role"] == "admin" and me["is_active"] is True


async def test_a_removal_reads_its_target_again_and_counts_a_promotion_since(app: FastAPI, users: Users) -> None:
    """The route reads the target before the removal's check: one promoted in between is an
    admin, so removing it waits for ``ADMINS_LOCK`` like any admin's removal (it went ahead
    without the lock, beside another admin change)."""
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import AsyncSession

    from api.app.users import service
    from api.app.users.models import User

    a, _ = await users.create(role="admin")
    b, _ = await users.create()
    async with AsyncSession(app.state.engine, expire_on_commit=False) as session:
        actor, stale = await session.get(User, a["id"]), await session.get(User, b["id"])
        assert actor is not None and stale is not None and not stale.is_admin
        await session.commit()  # the read is over; the objects keep what it saw
        async with app.state.engine.connect() as other:
            await other.execute(text("UPDATE users SET role = 'admin' WHERE id = :id"), {"id": b["id"]})
            await other.commit()
            await other.execute(service.ADMINS_LOCK)  # another admin change in progress
            check = asyncio.create_task(
                service._keep_an_admin(session=session, actor=actor, target=stale, action="demote")
            )
            await asyncio.sleep(1.0)
            assert not check.done(), "the removal of a promoted user did not wait for the other admin change"
            await other.rollback()
        await asyncio.wait_for(check, timeout=10)
        assert stale.is_admin, "the target was not read again"
        await session.rollback()


async def test_a_removal_behind_a_long_admin_change_is_a_409_not_a_503(
    app: FastAPI, client: httpx.AsyncClient, users: Users
) -> None:
    """Behind another admin's deletion of a long history (minutes), a removal gives up its wait
    at PostgreSQL's lock_timeout (``LOCK_TIMEOUT_MS``, 8 s) with 409 "in progress" and
    Retry-After: it waited to the connection's command timeout and answered 503, as if
    PostgreSQL were down. The same for a change of a user whose row another change holds."""
    from sqlalchemy import text

    from api.app.users import service

    _, headers = await users.create(role="admin")
    b, _ = await users.create(role="admin")
    plain, _ = await users.create()
    async with app.state.engine.connect() as other:
        await other.execute(service.ADMINS_LOCK)
        started = time.monotonic()
        r = await asyncio.wait_for(client.delete(f"/v1/users/{b['id']}", headers=headers), timeout=30)
        assert r.status_code == 409 and "in progress" in r.json()["detail"], r.text
        assert r.headers["retry-after"] == "5" and time.monotonic() - started < 10
        await other.rollback()
        await other.execute(text("SELECT 1 FROM users WHERE id = :id FOR UPDATE"), {"id": plain["id"]})
        r = await asyncio.wait_for(
            client.patch(f"/v1/users/{plain['id']}", json={"is_active": False}, headers=headers), timeout=30
        )
        assert r.status_code == 409 and "in progress" in r.json()["detail"], r.text
        await other.rollback()
    # Nothing was changed, and the same requests go through once the other change is over.
    assert (await client.get(f"/v1/users/{b['id']}", headers=headers)).json()["role"] == "admin"
    assert (await client.delete(f"/v1/users/{b['id']}", headers=headers)).status_code == 204
    r = await client.patch(f"/v1/users/{plain['id']}", json={"is_active": False}, headers=headers)
    assert r.status_code == 200 and r.json()["is_active"] is False


async def test_a_login_behind_a_long_account_deletion_is_a_409_not_a_503(
    app: FastAPI, client: httpx.AsyncClient, users: Users
) -> None:
    """An account whose deletion holds its row for minutes (a long history): its login (as any
    request that needs the row) waits for it and ends at PostgreSQL's lock_timeout
    (``LOCK_TIMEOUT_MS``, 8 s) with 409 "in progress" and Retry-After. It waited to the
    connection's 10 s command timeout and answered 503, as if PostgreSQL were down."""
    from sqlalchemy import text

    held, _ = await users.create()
    async with app.state.engine.connect() as other:
        await other.execute(text("SELECT 1 FROM users WHERE id = :id FOR UPDATE"), {"id": held["id"]})
        started = time.monotonic()
        r = await asyncio.wait_for(
            client.post("/v1/auth/login", data={"username": held["email"], "password": PASSWORD}), timeout=30
        )
        seconds = time.monotonic() - started
        await other.rollback()
    assert r.status_code == 409 and "in progress" in r.json()["detail"], r.text
    assert r.headers["retry-after"] == "5" and seconds < 10, seconds
    await login(client, held["email"], PASSWORD)


async def test_deleting_a_user_deletes_the_files_only_they_uploaded(
    client: httpx.AsyncClient, app: FastAPI, users: Users, admin_headers: dict[str, str]
) -> None:
    leaving, leaving_headers = await users.create()
    _, staying_headers = await users.create()
    own = encode(Image.new("RGB", (9, 7), (1, 2, 3)), "PNG")
    shared = encode(Image.new("RGB", (7, 9), (3, 2, 1)), "PNG")
    own_image = (await client.post("/v1/images", files={"file": ("own.png", own)}, headers=leaving_headers)).json()
    for headers in (leaving_headers, staying_headers):
        r = await client.post("/v1/images", files={"file": ("shared.png", shared)}, headers=headers)
        assert r.status_code == 201
    store = app.state.store
    shared_sha = r.json()["sha256"]
    assert await store.exists(own_image["sha256"]) and await store.exists(shared_sha)
    r = await client.delete(f"/v1/users/{leaving['id']}", headers=admin_headers)
    assert r.status_code == 204
    assert not await store.exists(own_image["sha256"])
    assert await store.exists(shared_sha)


async def test_deleting_a_user_deletes_their_uploads_a_chunk_per_statement(
    client: httpx.AsyncClient,
    app: FastAPI,
    users: Users,
    admin_headers: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A history of any size goes in statements that each stay under the connection's command
    timeout: one cascading delete of 100,000 uploads ran past it (503, nothing deleted)."""
    from sqlalchemy import event, func, select

    from api.app.images import service as images_service
    from api.app.images.models import Image as ImageRow

    leaving, headers = await users.create()
    for i in range(5):
        png = encode(Image.new("RGB", (4 + i, 4), (i, 9, 9)), "PNG")
        assert (await client.post("/v1/images", files={"file": (f"{i}.png", png)}, headers=headers)).status_code == 201
    monkeypatch.setattr(images_service, "OWNED_IMAGES_CHUNK", 2)
    statements: list[str] = []

    def seen(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("DELETE FROM IMAGES"):
            statements.append(statement)

    engine = app.state.engine.sync_engine
    event.listen(engine, "before_cursor_execute", seen)
    try:
        r = await client.delete(f"/v1/users/{leaving['id']}", headers=admin_headers)
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    assert r.status_code == 204, r.text
    assert len(statements) == 3, statements  # 2 + 2 + 1
    async with app.state.sessionmaker() as session:
        left = await session.scalar(
            select(func.count()).select_from(ImageRow).where(ImageRow.owner_id == leaving["id"])
        )
    assert left == 0


async def test_deleting_a_user_forgets_their_cached_answers_and_explanations(
    client: httpx.AsyncClient, app: FastAPI, users: Users, admin_headers: dict[str, str]
) -> None:
    """Their cached answers and heatmaps outlived the account by their TTLs (a day, a week);
    another user's stay."""
    from contracts import keys

    leaving, _ = await users.create()
    staying, _ = await users.create()
    redis = app.state.redis
    sha = "ab" * 32
    theirs = [
        keys.result_cache_key(leaving["id"], sha, "sketch", 3),
        keys.explanation_key(leaving["id"], sha, "sketch", 3),
        keys.explanation_inflight_key(leaving["id"], sha, "sketch", 3),
    ]
    others = [
        keys.result_cache_key(staying["id"], sha, "sketch", 3),
        keys.explanation_key(staying["id"], sha, "sketch", 3),
    ]
    for key in theirs + others:
        await redis.set(key, "{}", ex=600)
    await redis.zadd(keys.explanations_of_user_key(leaving["id"]), {"request": 1.0})
    try:
        r = await client.delete(f"/v1/users/{leaving['id']}", headers=admin_headers)
        assert r.status_code == 204, r.text
        assert await redis.exists(*theirs, keys.explanations_of_user_key(leaving["id"])) == 0
        assert await redis.exists(*others) == len(others)
    finally:
        await redis.delete(*theirs, *others, keys.explanations_of_user_key(leaving["id"]))


async def test_an_answer_that_comes_after_its_owner_was_deleted_is_not_cached(
    client: httpx.AsyncClient, app: FastAPI, users: Users, admin_headers: dict[str, str]
) -> None:
    """A prediction answered while its owner was being deleted: the answer, cached after the
    deletion's scan of their keys, outlived the account by a day. Another user's is cached."""
    from api.app.predictions import queue
    from contracts import keys
    from contracts.messages import PredictionStatus, ResultMessage

    leaving, _ = await users.create()
    staying, _ = await users.create()
    assert (await client.delete(f"/v1/users/{leaving['id']}", headers=admin_headers)).status_code == 204
    redis = app.state.redis
    answer = ResultMessage(
        job_id=str(uuid.uuid4()),
        prediction_id=str(uuid.uuid4()),
        model="sketch",
        version=3,
        sha256="cd" * 32,
        status=PredictionStatus.done,
    )
    try:
        for owner in (leaving["id"], staying["id"]):
            await queue.cache_result(redis, owner, answer, 600)
        assert not await redis.exists(keys.result_cache_key(leaving["id"], answer.sha256, "sketch", 3))
        assert await redis.exists(keys.result_cache_key(staying["id"], answer.sha256, "sketch", 3))
    finally:
        await redis.delete(*(keys.result_cache_key(u["id"], answer.sha256, "sketch", 3) for u in (leaving, staying)))


async def test_a_user_is_deleted_when_their_files_cannot_be_deleted_then(
    client: httpx.AsyncClient,
    app: FastAPI,
    users: Users,
    admin_headers: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The account and its rows are committed before the files go: a database or disk failure in
    that step leaves files to the blob sweep, and the answer is still 204 (a 503 said the delete
    failed, and the retry answered 404)."""
    from api.app.images import service as images_service

    leaving, headers = await users.create()
    png = encode(Image.new("RGB", (6, 5), (7, 7, 7)), "PNG")
    sha = (await client.post("/v1/images", files={"file": ("a.png", png)}, headers=headers)).json()["sha256"]

    async def failing(**kwargs: Any) -> int:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(images_service, "delete_blobs_in_chunks", failing)
    r = await client.delete(f"/v1/users/{leaving['id']}", headers=admin_headers)
    assert r.status_code == 204, r.text
    assert (await client.get(f"/v1/users/{leaving['id']}", headers=admin_headers)).status_code == 404
    assert await app.state.store.exists(sha)  # the sweep's now


async def test_deleting_a_user_holds_a_few_blob_locks_at_a_time(
    client: httpx.AsyncClient,
    app: FastAPI,
    users: Users,
    admin_headers: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The files of a deleted user's uploads go a chunk (SWEEP_CHUNK) per transaction: locking all
    of a large history's blobs in one ran PostgreSQL's shared lock table out of memory (about
    6,400 locks for the whole server), so such a user could never be deleted."""
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import AsyncSession

    from api.app.images import service as images_service

    leaving, headers = await users.create()
    shas = []
    for i in range(7):
        png = encode(Image.new("RGB", (3 + i, 5), (i, 40, 80)), "PNG")
        r = await client.post("/v1/images", files={"file": (f"{i}.png", png)}, headers=headers)
        assert r.status_code == 201
        shas.append(r.json()["sha256"])
    held: list[int] = []
    real = images_service._lock_blobs

    async def counted(session: AsyncSession, sha256s: list[str]) -> None:
        await real(session, sha256s)
        mine = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
        held.append(int(await session.scalar(text(mine)) or 0))

    monkeypatch.setattr(images_service, "SWEEP_CHUNK", 2)
    monkeypatch.setattr(images_service, "_lock_blobs", counted)
    r = await client.delete(f"/v1/users/{leaving['id']}", headers=admin_headers)
    assert r.status_code == 204
    assert held and max(held) <= 2, held
    assert [await app.state.store.exists(sha) for sha in shas] == [False] * 7


async def test_deleting_a_user_while_they_upload_waits_for_the_upload_and_leaves_no_file(
    client: httpx.AsyncClient, app: FastAPI, users: Users
) -> None:
    """The upload holds its owner's row, then its blob lock; the delete locks the row first, so
    neither waits for the other in the opposite order, and it reads the files after the upload."""
    from sqlalchemy import select
    from sqlalchemy.ext.asyncio import AsyncSession

    from api.app.images import service as images_service
    from api.app.users import service
    from api.app.users.models import User

    leaving, headers = await users.create()
    had = encode(Image.new("RGB", (5, 11), (9, 8, 7)), "PNG")
    new = encode(Image.new("RGB", (11, 5), (7, 8, 9)), "PNG")
    r = await client.post("/v1/images", files={"file": ("had.png", had)}, headers=headers)
    assert r.status_code == 201
    settings, store = app.state.settings, app.state.store
    shas = []
    async with AsyncSession(app.state.engine) as uploading, AsyncSession(app.state.engine) as deleting:
        # They upload what they already have (its blob lock held until the commit) ...
        info, sha = await images_service.inspect_upload(had, settings)
        await images_service.add_image(
            session=uploading, store=store, owner_id=leaving["id"], data=had, info=info, sha256=sha, filename="a.png"
        )
        shas.append(sha)
        # ... while an admin deletes them: the delete waits for the upload's transaction.
        admin = await deleting.scalar(select(User).where(User.email == ADMIN_EMAIL))
        target = await deleting.get(User, leaving["id"])
        assert admin is not None and target is not None
        deletion = asyncio.create_task(service.delete_user(session=deleting, store=store, actor=admin, user=target))
        await asyncio.sleep(1.0)
        assert not deletion.done()
        # New content in the same upload transaction still goes in, and is deleted with the rest.
        info, sha = await images_service.inspect_upload(new, settings)
        await images_service.add_image(
            session=uploading, store=store, owner_id=leaving["id"], data=new, info=info, sha256=sha, filename="b.png"
        )
        shas.append(sha)
        await uploading.commit()
        await asyncio.wait_for(deletion, 30)

        # Once they are gone, an upload of theirs (a token still valid) stores nothing.
        info, sha = await images_service.inspect_upload(encode(Image.new("RGB", (3, 13), (1, 1, 1)), "PNG"), settings)
        with pytest.raises(HTTPException) as gone:
            await images_service.add_image(
                session=uploading, store=store, owner_id=leaving["id"], data=b"", info=info, sha256=sha, filename="c"
            )
        assert gone.value.status_code == 401
        await uploading.rollback()
        shas.append(sha)
    for sha in shas:
        assert not await store.exists(sha), sha


def test_development_makes_its_own_secret_key_once(tmp_path: Path) -> None:
    """No published default signs tokens: development makes a random key, kept for every process."""
    key_file = tmp_path / "var" / "secret_key"
    first = Settings(_env_file=None, secret_key_file=key_file)  # type: ignore[call-arg]
    again = Settings(_env_file=None, secret_key_file=key_file)  # type: ignore[call-arg]
    assert len(first.secret_key) >= 32 and again.secret_key == first.secret_key
    assert key_file.stat().st_mode & 0o777 == 0o600
    other = Settings(_env_file=None, secret_key_file=tmp_path / "elsewhere")  # type: ignore[call-arg]
    assert other.secret_key != first.secret_key
    with pytest.raises(ValidationError, match="SECRET_KEY"):
        Settings(_env_file=None, environment="production", secret_key_file=key_file)  # type: ignore[call-arg]
