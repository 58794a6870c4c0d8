"""The model registry as live data: seeded from registry.yaml, audited, read by admins."""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import yaml
from fastapi import HTTPException
from PIL import Image, ImageDraw
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from api.app.core.config import Settings
from api.app.core.db import make_engine, make_sessionmaker
from api.app.predictions import service as predictions_service
from api.app.predictions.models import Job, ShadowPrediction
from api.app.registry import service
from api.app.registry.models import ModelVersion, RegistryChange
from contracts.registry import MAX_VERSION, MAX_WEIGHT, ModelEntry, Registry, load_registry
from tests.api.conftest import Stack, until
from tests.api.test_metrics import line_drawing, scrape, sketch_jobs_alone_and_beside, value
from tests.conftest import ADMIN_EMAIL, ADMIN_PASSWORD, PASSWORD, Users, login
from tests.images import encode
from tests.support import ROOT


async def _seed(settings: Settings, registry: Registry) -> int:
    engine = make_engine(settings)
    try:
        async with make_sessionmaker(engine)() as session:
            return await service.seed(session=session, registry=registry)
    finally:
        await engine.dispose()


async def _rows(settings: Settings) -> tuple[dict[str, ModelVersion], list[RegistryChange]]:
    engine = make_engine(settings)
    try:
        async with make_sessionmaker(engine)() as session:
            versions = {f"{v.name}@{v.version}": v for v in await session.scalars(select(ModelVersion))}
            changes = list(await session.scalars(select(RegistryChange).order_by(RegistryChange.id)))
            return versions, changes
    finally:
        await engine.dispose()


async def test_seeding_creates_then_updates_specs_and_keeps_operators_state(
    fresh_settings: Settings, settings: Settings
) -> None:
    registry = load_registry(settings.registry_path)
    # Two processes starting at once seed once between them.
    assert sorted(await asyncio.gather(_seed(fresh_settings, registry), _seed(fresh_settings, registry))) == [
        0,
        len(registry.models),
    ]
    versions, changes = await _rows(fresh_settings)
    assert set(versions) == {m.key for m in registry.models}
    assert [(c.action, c.actor) for c in changes] == [("register", "registry.yaml")] * len(registry.models)
    sketch2 = versions["sketch@2"]
    assert (sketch2.channel, sketch2.weight, sketch2.enabled) == ("canary", 0, True)
    assert (versions["sketch@3"].channel, versions["sketch@3"].weight) == ("stable", 100)
    assert (versions["sketch@1"].channel, versions["sketch@1"].weight) == ("canary", 0)
    assert sketch2.spec["file"] == "{trained_dir}/sketch/v2/model.keras" and "channel" not in sketch2.spec
    assert sketch2.display_name == "Sketch CNN, 6 categories (v2)"

    # An operator's promotion survives the next start; a changed spec is taken, and audited.
    engine = make_engine(fresh_settings)
    async with make_sessionmaker(engine)() as session:
        row = await session.scalar(select(ModelVersion).where(ModelVersion.name == "sketch", ModelVersion.version == 2))
        assert row is not None
        row.channel, row.weight = "stable", 100
        await session.commit()
    await engine.dispose()
    changed = registry.model_copy(
        update={
            "models": [
                m.model_copy(update={"description": "retrained"}) if m.key == "sketch@2" else m
                for m in registry.models
                if m.key != "birds@1"  # a version the file no longer names stays
            ]
        }
    )
    assert await _seed(fresh_settings, changed) == 1
    assert await _seed(fresh_settings, changed) == 0
    versions, changes = await _rows(fresh_settings)
    assert "birds@1" in versions
    sketch2 = versions["sketch@2"]
    assert (sketch2.channel, sketch2.weight, sketch2.spec["description"]) == ("stable", 100, "retrained")
    last = changes[-1]
    assert (last.action, last.model, last.version) == ("update", "sketch", 2)
    assert last.before is not None and last.after is not None
    assert last.before["2"]["spec"]["description"] != "retrained" == last.after["2"]["spec"]["description"]


async def test_the_file_never_redefines_a_version_a_training_run_registered(
    fresh_settings: Settings, settings: Settings
) -> None:
    registry = load_registry(settings.registry_path)
    await _seed(fresh_settings, registry)
    trained = next(m for m in registry.models if m.key == "sketch@3").model_copy(
        update={"version": 9, "channel": "shadow", "file": "{trained_dir}/sketch/v9/model.keras"}
    )
    engine = make_engine(fresh_settings)
    try:
        async with make_sessionmaker(engine)() as session:
            await service.register_version(
                session=session, actor=service.Actor(None, "training run 42"), entry=trained, reason="trained"
            )
    finally:
        await engine.dispose()
    # Later, someone writes a sketch@9 of their own into the file: the trained one stays as it is.
    hand_written = trained.model_copy(update={"file": "{models_dir}/my_sketch.keras", "description": "mine"})
    assert await _seed(fresh_settings, registry.model_copy(update={"models": [*registry.models, hand_written]})) == 0
    versions, changes = await _rows(fresh_settings)
    assert versions["sketch@9"].spec["file"] == "{trained_dir}/sketch/v9/model.keras"
    assert not [c for c in changes if c.version == 9 and c.action == "update"]
    # A file entry that says the same as the run (only operators' state differs) is no conflict.
    assert await _seed(fresh_settings, registry.model_copy(update={"models": [*registry.models, trained]})) == 0


async def test_a_stable_version_new_in_the_file_takes_over_from_the_stable_one_in_the_database(
    fresh_settings: Settings, settings: Settings
) -> None:
    registry = load_registry(settings.registry_path)
    # A database seeded before sketch@3 existed, when sketch@1 was the stable version.
    before = registry.model_copy(
        update={
            "models": [
                m.model_copy(update={"channel": "stable"}) if m.key == "sketch@1" else m
                for m in registry.models
                if m.key != "sketch@3"
            ]
        }
    )
    await _seed(fresh_settings, before)
    await _seed(fresh_settings, registry)
    versions, changes = await _rows(fresh_settings)
    assert (versions["sketch@3"].channel, versions["sketch@3"].weight) == ("stable", 100)
    assert (versions["sketch@1"].channel, versions["sketch@1"].weight) == ("canary", 0), "two stables split traffic"
    handover = next(c for c in changes if c.action == "channel_canary")
    assert (handover.actor, handover.model, handover.version) == ("registry.yaml", "sketch", 1)
    assert "sketch@3, new in registry.yaml, is the stable version" in handover.reason
    # Seeding again changes nothing.
    assert await _seed(fresh_settings, registry) == 0


async def test_of_two_stable_versions_new_in_the_file_the_last_one_is_the_stable_one(
    fresh_settings: Settings, settings: Settings
) -> None:
    """Two versions of a model added to registry.yaml at once, both stable (or with no channel,
    which is stable): each took over from the versions already in the database, not from each
    other, and the two split the traffic."""
    registry = load_registry(settings.registry_path)
    await _seed(fresh_settings, registry)
    stable = next(m for m in registry.models if m.key == "sketch@3")
    added = [stable.model_copy(update={"version": v, "channel": "stable"}) for v in (7, 8)]
    await _seed(fresh_settings, registry.model_copy(update={"models": [*registry.models, *added]}))
    versions, changes = await _rows(fresh_settings)
    stables = sorted(k for k, v in versions.items() if v.name == "sketch" and v.channel == "stable")
    assert stables == ["sketch@8"], stables
    assert (versions["sketch@7"].channel, versions["sketch@7"].weight) == ("canary", 0)
    handover = [c for c in changes if c.action == "channel_canary" and c.model == "sketch"]
    assert len(handover) == 2 and {c.version for c in handover} == {3, 7}


async def test_admins_read_the_registry_and_its_history(
    client: httpx.AsyncClient, admin_headers: dict[str, str], users: Users, settings: Settings
) -> None:
    registry = load_registry(settings.registry_path)
    r = await client.get("/v1/admin/registry", headers=admin_headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["revision"] >= len(registry.models)
    assert [f"{v['name']}@{v['version']}" for v in body["versions"]] == sorted(
        (m.key for m in registry.models), key=lambda k: (k.split("@")[0], int(k.split("@")[1]))
    )
    changes = (await client.get("/v1/admin/registry/changes", params={"model": "sketch"}, headers=admin_headers)).json()
    # Tests of this process that ran earlier may have changed sketch's versions since the seeding.
    seeded = [c for c in changes["data"] if c["actor"] == "registry.yaml"]
    assert sorted(c["version"] for c in seeded) == [1, 2, 3] and {c["action"] for c in seeded} == {"register"}
    ids = [c["id"] for c in changes["data"]]
    assert changes["count"] == len(ids) >= 3 and ids == sorted(ids, reverse=True)  # newest first

    _, headers = await users.create()
    assert (await client.get("/v1/admin/registry", headers=headers)).status_code == 403
    assert (await client.get("/v1/admin/registry/changes", headers=headers)).status_code == 403
    bad = await client.get("/v1/admin/registry/changes", params={"model": "a\x00b"}, headers=admin_headers)
    assert bad.status_code == 422


SKETCH_NEW = {
    "name": "sketch",
    "description": "v3's weights registered again, as a retrained model would be",
    "runtime": "keras",
    "file": "{trained_dir}/sketch/v3/model.keras",
    "labels": "{trained_dir}/sketch/v3/labels.txt",
    "input": {"height": 28, "width": 28, "mode": "L"},
    "preprocessing": "sketch",
    "reason": "retrained on this week's feedback",
}


def drawing() -> bytes:
    img = Image.new("L", (28, 28), 255)
    ImageDraw.Draw(img).ellipse((4, 4, 24, 24), outline=0, width=2)
    return encode(img, "PNG")


async def test_a_registered_version_is_served_then_split_promoted_and_rolled_back(own_stack: Stack) -> None:
    client = own_stack.client
    admin = await login(client, ADMIN_EMAIL, ADMIN_PASSWORD)
    await own_stack.start_workers(1, SERVE_MODELS="sketch")

    async def available(key: str) -> bool:
        models = (await client.get("/v1/models", headers=admin)).json()["data"]
        return any(m["ref"] == key and m["available"] for m in models)

    await until(lambda: available("sketch@3"), 60, "sketch@3 served")

    # Registered through the API: loaded by the running worker and served within 5 s.
    r = await client.post("/v1/admin/registry/versions", json=SKETCH_NEW, headers=admin)
    assert r.status_code == 201, r.text
    assert (r.json()["version"], r.json()["channel"], r.json()["weight"]) == (4, "canary", 0)
    assert await until(lambda: available("sketch@4"), 5, "sketch@4 served") <= 5
    pinned = await client.post(
        "/model/predict", params={"models": "sketch@4"}, files={"file": ("d.png", drawing())}, headers=admin
    )
    assert pinned.status_code == 200 and pinned.json()["version"] == 4, pinned.text

    # 90/10 over 50 users, 20 requests each: each user on one version, the split within 4 points.
    r = await client.put(
        "/v1/admin/registry/models/sketch/weights",
        json={"weights": {"3": 90, "4": 10}, "reason": "canary"},
        headers=admin,
    )
    assert r.status_code == 200, r.text
    people = [await login(client, *(await _new_user(client, admin))) for _ in range(50)]
    seen: dict[int, set[int]] = {}
    gate = asyncio.Semaphore(10)

    async def ask(i: int, headers: dict[str, str]) -> None:
        async with gate:
            r = await client.post(
                "/model/predict", params={"models": "sketch"}, files={"file": ("d.png", drawing())}, headers=headers
            )
        assert r.status_code == 200, r.text
        seen.setdefault(i, set()).add(r.json()["version"])

    before = await scrape(client)
    await asyncio.gather(*(ask(i, h) for i, h in enumerate(people) for _ in range(20)))
    assert all(len(versions) == 1 for versions in seen.values()), seen
    canary_share = sum(versions == {4} for versions in seen.values()) / len(seen)
    assert abs(canary_share - 0.10) <= 0.04, canary_share
    # Prometheus sees the same split, beside the share the weights give.
    scraped = await scrape(client)
    routed = {
        v: value(scraped, "portal_routed_requests_total", model="sketch", version=str(v))
        - value(before, "portal_routed_requests_total", model="sketch", version=str(v))
        for v in (3, 4)
    }
    assert sum(routed.values()) == 1000 and routed[4] / 1000 == canary_share, routed

    async def weights_exported() -> bool:
        # sketch@4 exists in this test's registry alone (gauges are per process, apps are many here).
        samples = await scrape(client)
        return value(samples, "portal_traffic_weight_share", model="sketch", version="4") == pytest.approx(0.1)

    await until(weights_exported, 10, "the weights' shares exported")

    # Promotion: version 4 takes the stable traffic, version 3 stays loaded; rollback in one call.
    r = await client.post(
        "/v1/admin/registry/models/sketch/versions/4/promote", json={"reason": "better on feedback"}, headers=admin
    )
    assert r.status_code == 200, r.text
    states = {v["version"]: (v["channel"], v["weight"]) for v in r.json()["versions"]}
    assert states[4] == ("stable", 100) and states[3] == ("canary", 0)
    after = await client.post(
        "/model/predict", files={"file": ("d.png", drawing())}, params={"models": "sketch"}, headers=people[0]
    )
    assert after.json()["version"] == 4
    # Promoting it again changes nothing: refused, so the rollback below still undoes the real one.
    again = await client.post(
        "/v1/admin/registry/models/sketch/versions/4/promote", json={"reason": "again"}, headers=admin
    )
    assert again.status_code == 409 and "stable version already" in again.text, again.text
    # A rollback "from" a version that is not the stable one is refused: the caller saw another state.
    stale = await client.post(
        "/v1/admin/registry/models/sketch/rollback", json={"reason": "x", "from_version": 3}, headers=admin
    )
    assert stale.status_code == 409 and "sketch@3 is no longer the stable version (sketch@4 is)" in stale.text
    r = await client.post(
        "/v1/admin/registry/models/sketch/rollback",
        json={"reason": "worse in production", "from_version": 4},
        headers=admin,
    )
    assert r.status_code == 200, r.text
    states = {v["version"]: (v["channel"], v["weight"]) for v in r.json()["versions"]}
    assert states[3] == ("stable", 90) and states[4] == ("canary", 10)
    # The same click sent again: refused, never an older promotion undone.
    again = await client.post(
        "/v1/admin/registry/models/sketch/rollback", json={"reason": "twice", "from_version": 4}, headers=admin
    )
    assert again.status_code == 409 and "sketch@4 is no longer the stable version" in again.text, again.text
    again = await client.post("/v1/admin/registry/models/sketch/rollback", json={"reason": "twice"}, headers=admin)
    assert again.status_code == 409

    # Audited: who, what, why, newest first.
    changes = (await client.get("/v1/admin/registry/changes", params={"model": "sketch"}, headers=admin)).json()
    recent = [(c["action"], c["actor"], c["reason"]) for c in changes["data"][:4]]
    assert recent == [
        ("rollback", ADMIN_EMAIL, "worse in production"),
        ("promote", ADMIN_EMAIL, "better on feedback"),
        ("set_weights", ADMIN_EMAIL, "canary"),
        ("register", ADMIN_EMAIL, "retrained on this week's feedback"),
    ]
    assert changes["data"][0]["before"]["4"]["channel"] == "stable"
    # The rollback names the promotion it undid; the others undo nothing.
    assert changes["data"][0]["undoes"] == changes["data"][1]["id"]
    assert [c["undoes"] for c in changes["data"][1:4]] == [None, None, None]


async def test_registry_changes_are_checked(own_stack: Stack) -> None:
    client = own_stack.client
    admin = await login(client, ADMIN_EMAIL, ADMIN_PASSWORD)
    email, password = await _new_user(client, admin)
    user = await login(client, email, password)
    weights = "/v1/admin/registry/models/sketch/weights"
    assert (await client.put(weights, json={"weights": {"3": 50}, "reason": "x"}, headers=user)).status_code == 403
    cases = [
        # No worker serves sketch@2 here: it cannot get traffic, nor be promoted.
        ("PUT", weights, {"weights": {"2": 10}, "reason": "x"}, 409),
        ("POST", "/v1/admin/registry/models/sketch/versions/2/promote", {"reason": "x"}, 409),
        # The only stable version keeps traffic.
        ("PUT", weights, {"weights": {"3": 0}, "reason": "x"}, 409),
        ("PATCH", "/v1/admin/registry/models/sketch/versions/3", {"channel": "retired", "reason": "x"}, 409),
        ("PATCH", "/v1/admin/registry/models/sketch/versions/3", {"enabled": False, "reason": "x"}, 409),
        ("PUT", weights, {"weights": {"1": -1}, "reason": "x"}, 422),
        # One version named twice: which weight was meant is not known.
        ("PUT", weights, {"weights": {"3": 100, "03": 5}, "reason": "x"}, 422),
        ("PUT", weights, {"weights": {"3": 100, " 3": 5}, "reason": "x"}, 422),
        # Keys are version numbers in digits: "3.0" and "3_0" would be read as 3 and 30.
        ("PUT", weights, {"weights": {"3": 100, "3.0": 5}, "reason": "x"}, 422),
        ("PUT", weights, {"weights": {"3_0": 5, "3": 100}, "reason": "x"}, 422),
        ("PUT", weights, {"weights": {"3": 100, "1e0": 5}, "reason": "x"}, 422),
        ("POST", "/v1/admin/registry/models/sketch/rollback", {"reason": "x", "from_version": 99}, 404),
        ("POST", "/v1/admin/registry/models/sketch/rollback", {"reason": "x", "from_version": True}, 422),
        ("PUT", weights, {"weights": {"9": 1}, "reason": "x"}, 404),
        ("PUT", "/v1/admin/registry/models/nothing/weights", {"weights": {"1": 1}, "reason": "x"}, 404),
        ("PUT", weights, {"weights": {"1": 100}, "reason": ""}, 422),
        ("POST", "/v1/admin/registry/models/sketch/rollback", {"reason": "x"}, 409),
        ("POST", "/v1/admin/registry/versions", {**SKETCH_NEW, "file": "/etc/passwd"}, 422),
        ("POST", "/v1/admin/registry/versions", {**SKETCH_NEW, "file": "{trained_dir}/../../etc/passwd"}, 422),
        ("POST", "/v1/admin/registry/versions", {**SKETCH_NEW, "version": 1}, 409),
        # Past the cap no next number would be left for the model's runs and registrations.
        ("POST", "/v1/admin/registry/versions", {**SKETCH_NEW, "version": 2**31 - 1}, 422),
        ("POST", "/v1/admin/registry/versions", {**SKETCH_NEW, "version": MAX_VERSION + 1}, 422),
        ("PATCH", "/v1/admin/registry/models/sketch/versions/2", {"channel": "stable", "reason": "x"}, 422),
        # Files stay inside their folder, whatever the spelling.
        *(
            ("POST", "/v1/admin/registry/versions", {**SKETCH_NEW, "file": bad}, 422)
            for bad in (
                "{trained_dir}/../trained/sketch/v2/model.keras",
                "{models_dir}/..",
                "{trained_dir}/sketch/./v2/model.keras",
                "{trained_dir}/sketch\\v2\\model.keras",
                "{trained_dir}/sketch/v2/model.keras\n",
            )
        ),
        ("POST", "/v1/admin/registry/versions", {**SKETCH_NEW, "input": {"height": 0, "width": 28, "mode": "L"}}, 422),
        # A change must change something, and say why.
        ("PATCH", "/v1/admin/registry/models/sketch/versions/1", {"reason": "x"}, 422),
        ("PATCH", "/v1/admin/registry/models/sketch/versions/1", {"enabled": "yes", "reason": "x"}, 422),
        ("PATCH", "/v1/admin/registry/models/sketch/versions/1", {"enabled": True, "reason": "x"}, 409),
        ("PUT", weights, {"weights": {"3": 100}, "reason": "x"}, 409),
        ("PUT", weights, {"weights": {"3": True}, "reason": "x"}, 422),
        ("PUT", weights, {"weights": {"1": 50}, "reason": "   "}, 422),
        ("POST", "/v1/admin/registry/models/sketch/versions/3/promote", {"reason": "x"}, 409),
    ]
    for method, path, body, status in cases:
        r = await client.request(method, path, json=body, headers=admin)
        assert r.status_code == status, (method, path, body, r.text)
    # Retiring a canary is allowed, and audited; nothing above left a trace.
    r = await client.patch(
        "/v1/admin/registry/models/sketch/versions/2",
        json={"channel": "retired", "reason": "superseded"},
        headers=admin,
    )
    assert r.status_code == 200, r.text
    changes = (await client.get("/v1/admin/registry/changes", params={"model": "sketch"}, headers=admin)).json()
    assert [c["action"] for c in changes["data"]] == ["channel_retired", "register", "register", "register"]
    models = (await client.get("/v1/models", headers=user)).json()["data"]
    assert "sketch@2" not in {m["ref"] for m in models}
    # Named by someone who knew it: told it is retired, not that it never existed.
    r = await client.post(
        "/model/predict", params={"models": "sketch@2"}, files={"file": ("d.png", drawing())}, headers=user
    )
    assert r.status_code == 422 and r.json()["detail"].startswith("Model sketch@2 is retired;"), r.text
    # Registered at once without a number: each gets the next free one.
    answers = await asyncio.gather(
        *(client.post("/v1/admin/registry/versions", json=SKETCH_NEW, headers=admin) for _ in range(3))
    )
    assert [a.status_code for a in answers] == [201] * 3, [a.text for a in answers]
    assert sorted(a.json()["version"] for a in answers) == [4, 5, 6]
    # A training run still going holds the number it will register its version as.
    from tests.api.test_training import a_run

    async with own_stack.app.state.sessionmaker() as session:
        session.add(a_run(7, status="running", base=3))
        await session.commit()
    r = await client.post("/v1/admin/registry/versions", json=SKETCH_NEW, headers=admin)
    assert r.status_code == 201 and r.json()["version"] == 8, r.text
    r = await client.post("/v1/admin/registry/versions", json={**SKETCH_NEW, "version": 7}, headers=admin)
    assert r.status_code == 409 and "training run" in r.json()["detail"], r.text


async def enable(session: AsyncSession, enabled: bool, *, available: set[str]) -> service.Changed:
    """Enables or disables sketch@3, as an admin would."""
    return await service.set_channel(
        session=session,
        actor=service.Actor(None, "admin@example.com"),
        name="sketch",
        version=3,
        channel=None,
        enabled=enabled,
        reason="x",
        available=available,
    )


async def test_a_disabled_version_gets_no_traffic_back_before_a_worker_loads_it(own_stack: Stack) -> None:
    """Workers let a disabled version go: a rollback, or enabling it again, that gave it traffic at
    once would send its requests to no worker (422 "unavailable" when it is the stable version)."""
    admin = service.Actor(None, "admin@example.com")
    async with own_stack.app.state.sessionmaker() as session:
        await service.promote(
            session=session, actor=admin, name="sketch", version=2, reason="x", available={"sketch@2"}
        )
        await service.set_weights(
            session=session, actor=admin, name="sketch", weights={3: 10}, reason="x", available={"sketch@3"}
        )
        changed = await enable(session, False, available=set())
        assert {r.version: (r.enabled, r.weight) for r in changed.versions}[3] == (False, 0)
        # Nor is it given traffic while its workers, told a moment ago, may still have it loaded.
        with pytest.raises(HTTPException) as refused:
            await service.set_weights(
                session=session, actor=admin, name="sketch", weights={3: 10}, reason="x", available={"sketch@3"}
            )
        assert refused.value.status_code == 409 and "is disabled" in refused.value.detail
        await session.rollback()
        # The rollback would make sketch@3 stable again with all the traffic: refused while disabled.
        with pytest.raises(HTTPException) as refused:
            await service.rollback(session=session, actor=admin, name="sketch", reason="x", available={"sketch@2"})
        assert refused.value.status_code == 409 and "disabled since" in refused.value.detail
        await session.rollback()
        # Enabled again with a weight stored before this rule (or by registry.yaml): only once loaded.
        await session.execute(
            update(ModelVersion).where(ModelVersion.name == "sketch", ModelVersion.version == 3).values(weight=10)
        )
        await session.commit()
        with pytest.raises(HTTPException) as refused:
            await enable(session, True, available={"sketch@2"})
        assert refused.value.status_code == 409 and "no live worker has it loaded" in refused.value.detail
        await session.rollback()
        changed = await enable(session, True, available={"sketch@2", "sketch@3"})
        assert {r.version: (r.enabled, r.weight) for r in changed.versions}[3] == (True, 10)


@pytest.mark.usefixtures("everything_served")
async def test_answers_of_a_version_retired_while_no_worker_has_it_expire_at_once(own_stack: Stack) -> None:
    """No worker is up. Jobs wait for sketch@2 alone and for sketch@2 beside sketch@3; sketch@2 is
    retired. Within a few looks (not at the 300 s deadline) its predictions are expired with the
    reason, the job that asked it alone is over, and the other still waits for sketch@3 only.
    sketch@2's queued entries, images included, leave Redis (nothing would ever read them; Redis
    evicts nothing); sketch@3's stays."""
    client = own_stack.client
    redis = own_stack.app.state.redis
    admin = await login(client, ADMIN_EMAIL, ADMIN_PASSWORD)
    _, alone, beside = await sketch_jobs_alone_and_beside(client, admin, drawing())
    queued = {v: await redis.xlen(f"jobs:sketch@{v}") for v in (2, 3)}
    assert queued[2] >= 2 and queued[3] >= 1, queued

    async def job(accepted: httpx.Response) -> dict[str, Any]:
        r = await client.get(f"/v1/predictions/{accepted.json()['job_id']}", headers=admin)
        assert r.status_code == 200, r.text
        return cast(dict[str, Any], r.json())

    await asyncio.sleep(2.5)  # a few looks: nothing expires while sketch@2 is a canary
    assert (await job(alone))["status"] == "queued"
    r = await client.patch(
        "/v1/admin/registry/models/sketch/versions/2",
        json={"channel": "retired", "reason": "superseded"},
        headers=admin,
    )
    assert r.status_code == 200, r.text

    async def over() -> bool:
        return (await job(alone))["status"] == "expired"

    assert await until(over, 15, "sketch@2's job expired") < 15
    [answer] = (await job(alone))["results"]
    assert answer["error"].startswith("sketch@2 was retired before a worker answered it"), answer
    other = await job(beside)
    assert other["status"] == "queued", other
    assert {(p["version"], p["status"]) for p in other["results"]} == {(2, "expired"), (3, "queued")}, other

    async def dropped() -> bool:
        return int(await redis.xlen("jobs:sketch@2")) == 0

    assert await until(dropped, 15, "sketch@2's entries dropped") < 15
    assert await redis.xlen("jobs:sketch@3") == queued[3]


@pytest.mark.usefixtures("everything_served")
async def test_a_batch_waits_for_a_disabled_version_and_ends_without_a_retired_one(
    own_stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No worker is up, so the lane queues none of three batches: for sketch@1 alone, for sketch@2
    alone and for sketch@2 beside sketch@3. A person's job waits for sketch@1. sketch@1 is
    disabled: the person's job expires, its batch keeps waiting. sketch@2 is retired: its batch
    ends with each image expired with the reason, and the other batch waits for sketch@3 only,
    then ends once a worker answers it."""
    monkeypatch.setattr(predictions_service, "EXPIRE_CHUNK", 2)  # three images: two transactions
    client = own_stack.client
    admin = await login(client, ADMIN_EMAIL, ADMIN_PASSWORD)
    files = [("file", (f"d{i}.png", line_drawing(i))) for i in range(3)]

    async def batch(models: list[str]) -> str:
        r = await client.post("/v1/batches", files=files, data={"models": models}, headers=admin)
        assert r.status_code == 202, r.text
        return str(r.json()["id"])

    first, second, both = [await batch(m) for m in (["sketch@1"], ["sketch@2"], ["sketch@2", "sketch@3"])]
    stored = await client.post("/v1/images", files={"file": ("p.png", drawing())}, headers=admin)
    person = await client.post(
        "/v1/predictions", json={"image_id": stored.json()["id"], "models": ["sketch@1"]}, headers=admin
    )
    assert person.status_code == 202, person.text

    async def detail(batch_id: str) -> dict[str, Any]:
        r = await client.get(f"/v1/batches/{batch_id}", headers=admin)
        assert r.status_code == 200, r.text
        return cast(dict[str, Any], r.json())

    async def rows(batch_id: str) -> set[tuple[int, str, str | None]]:
        r = await client.get(f"/v1/batches/{batch_id}/results", headers=admin)
        assert r.status_code == 200, r.text
        return {(row["version"], row["status"], row["error"]) for row in r.json()["data"]}

    for version, change in ((1, {"enabled": False}), (2, {"channel": "retired"})):
        r = await client.patch(
            f"/v1/admin/registry/models/sketch/versions/{version}", json={**change, "reason": "x"}, headers=admin
        )
        assert r.status_code == 200, r.text

    async def second_over() -> bool:
        return (await detail(second))["status"] == "done"

    assert await until(second_over, 15, "the batch for the retired sketch@2 ended") < 15
    retired = "sketch@2 was retired before a worker answered it; send the image again for the version serving now"
    assert await rows(second) == {(2, "expired", retired)}
    assert (await detail(second))["counts"]["failed"] == 3
    assert await rows(both) == {(2, "expired", retired), (3, "pending", None)}
    assert (await detail(both))["status"] == "running"
    # The person's job for the disabled sketch@1 expired; the batch for it waits, nothing lost.
    job = (await client.get(f"/v1/predictions/{person.json()['job_id']}", headers=admin)).json()
    assert job["status"] == "expired", job
    waiting = await detail(first)
    assert (waiting["status"], waiting["counts"]["queued"], waiting["counts"]["failed"]) == ("running", 3, 0), waiting
    assert await rows(first) == {(1, "pending", None)}
    # A worker for sketch@3: the other batch's images are answered by it, and the batch ends.
    await own_stack.start_workers(1, SERVE_MODELS="sketch")

    async def both_over() -> bool:
        return (await detail(both))["status"] == "done"

    await until(both_over, 90, "the batch ended with sketch@3's answers")
    assert await rows(both) == {(2, "expired", retired), (3, "done", None)}
    counts = (await detail(both))["counts"]
    assert (counts["done"], counts["partly_answered"], counts["failed"]) == (3, 3, 0), counts
    assert await rows(first) == {(1, "pending", None)}


async def test_a_verdict_on_a_retired_version_names_its_labels_after_its_redis_key_went(own_stack: Stack) -> None:
    """A worker served sketch@1 and published its labels; it is retired and its Redis key goes
    (a week later, or with Redis's data). Its labels are still listed for it, and a verdict on an
    old prediction of it can still name the right label."""
    import redis.asyncio as aioredis

    from contracts.keys import labels_key

    client = own_stack.client
    admin = await login(client, ADMIN_EMAIL, ADMIN_PASSWORD)
    await own_stack.start_workers(1, SERVE_MODELS="sketch@1")
    stored = await client.post("/v1/images", files={"file": ("d.png", drawing())}, headers=admin)
    r = await client.post(
        "/v1/predictions",
        json={"image_id": stored.json()["id"], "models": ["sketch@1"]},
        params={"wait": 60},
        headers=admin,
    )
    assert r.status_code in (200, 202), r.text

    async def answered() -> dict[str, Any] | None:
        job = (await client.get(f"/v1/predictions/{r.json()['job_id']}", headers=admin)).json()
        return cast(dict[str, Any], job) if job["status"] == "done" else None

    await until(answered, 60, "sketch@1 answered")
    [prediction] = (await answered() or {})["results"]
    labels = (await client.get("/v1/models/sketch@1/labels", headers=admin)).json()["labels"]
    right = next(label for label in labels if label != prediction["label"])
    await asyncio.sleep(6)  # a look of the API's (RECONCILE_INTERVAL_SECONDS) keeps them
    r = await client.patch(
        "/v1/admin/registry/models/sketch/versions/1", json={"channel": "retired", "reason": "x"}, headers=admin
    )
    assert r.status_code == 200, r.text
    redis = aioredis.Redis.from_url(own_stack.redis_server.url)
    try:
        assert await redis.delete(labels_key("sketch", 1)) == 1
    finally:
        await redis.aclose()
    listed = (await client.get("/v1/models", headers=admin)).json()["data"]
    assert "sketch@1" not in [m["ref"] for m in listed]
    r = await client.get("/v1/models/sketch@1/labels", headers=admin)
    assert r.status_code == 200 and r.json()["labels"] == labels, r.text
    r = await client.post(
        "/v1/feedback",
        json={"prediction_id": prediction["id"], "is_correct": False, "correct_label": right},
        headers=admin,
    )
    assert r.status_code == 201, r.text
    for ref, status in (("sketch@9", 404), ("sketch@x", 422), ("sketch", 422)):
        r = await client.get(f"/v1/models/{ref}/labels", headers=admin)
        assert r.status_code == status, (ref, r.text)
    # Back as a shadow: its labels are still there for whom it answered, and unknown to others.
    r = await client.patch(
        "/v1/admin/registry/models/sketch/versions/1",
        json={"channel": "shadow", "reason": "compare again"},
        headers=admin,
    )
    assert r.status_code == 200, r.text
    r = await client.get("/v1/models/sketch@1/labels", headers=admin)
    assert r.status_code == 200 and (r.json()["ref"], r.json()["labels"]) == ("sketch@1", labels), r.text
    assert r.json()["display_name"].startswith("Sketch"), r.text
    other = await login(client, *await _new_user(client, admin))
    r = await client.get("/v1/models/sketch@1/labels", headers=other)
    assert r.status_code == 404 and r.json()["detail"] == "Unknown model 'sketch@1'", r.text


async def _new_user(client: httpx.AsyncClient, admin: dict[str, str]) -> tuple[str, str]:
    email = f"user-{uuid.uuid4().hex[:10]}@example.com"
    r = await client.post("/v1/users", json={"email": email, "password": PASSWORD}, headers=admin)
    assert r.status_code == 201, r.text
    return email, PASSWORD


@pytest.mark.usefixtures("everything_served")
async def test_each_answer_to_changes_at_once_names_its_own_change(own_stack: Stack) -> None:
    """Eight weight changes at once take turns; each answer's revision is the id of the change it
    made, and its versions are as that change left them (not as a later one did)."""
    client = own_stack.client
    admin = await login(client, ADMIN_EMAIL, ADMIN_PASSWORD)

    async def change(i: int) -> dict[str, Any]:
        r = await client.put(
            "/v1/admin/registry/models/sketch/weights",
            json={"weights": {"1": i + 1}, "reason": f"at once {i}"},
            headers=admin,
        )
        assert r.status_code == 200, r.text
        return dict(r.json())

    answers = await asyncio.gather(*(change(i) for i in range(8)))
    trail = (await client.get("/v1/admin/registry/changes", params={"model": "sketch"}, headers=admin)).json()
    reasons = {c["id"]: c["reason"] for c in trail["data"]}
    for i, answer in enumerate(answers):
        assert reasons[answer["revision"]] == f"at once {i}", (answer["revision"], reasons)
        shown = {v["version"]: v["weight"] for v in answer["versions"]}
        assert shown[1] == i + 1, (i, shown)


async def test_changes_under_load_lose_no_request(own_stack: Stack) -> None:
    """20 clients predict without a pause through five registry changes: no error, every answer
    from a version enabled then, and each phase's share of the canary within a few points."""
    client = own_stack.client
    admin = await login(client, ADMIN_EMAIL, ADMIN_PASSWORD)
    await own_stack.start_workers(1, SERVE_MODELS="sketch")
    r = await client.post("/v1/admin/registry/versions", json=SKETCH_NEW, headers=admin)
    assert r.status_code == 201, r.text

    async def both_served() -> bool:
        models = (await client.get("/v1/models", headers=admin)).json()["data"]
        return {"sketch@3", "sketch@4"} <= {m["ref"] for m in models if m["available"]}

    await until(both_served, 30, "sketch@3 and sketch@4 served")
    people = [await login(client, *(await _new_user(client, admin))) for _ in range(20)]
    loop = asyncio.get_running_loop()
    answers: list[tuple[float, int]] = []
    errors: list[str] = []
    stop = asyncio.Event()

    async def keep_asking(headers: dict[str, str]) -> None:
        while not stop.is_set():
            started = loop.time()
            r = await client.post(
                "/model/predict", params={"models": "sketch"}, files={"file": ("d.png", drawing())}, headers=headers
            )
            if r.status_code != 200:
                errors.append(r.text)
            else:
                answers.append((started, r.json()["version"]))

    changes: list[tuple[str, str, dict[str, Any], float]] = [
        ("PUT", "/v1/admin/registry/models/sketch/weights", {"weights": {"3": 90, "4": 10}}, 0.10),
        ("PUT", "/v1/admin/registry/models/sketch/weights", {"weights": {"3": 50, "4": 50}}, 0.50),
        ("POST", "/v1/admin/registry/models/sketch/versions/4/promote", {}, 1.0),
        ("POST", "/v1/admin/registry/models/sketch/rollback", {}, 0.50),
        ("PUT", "/v1/admin/registry/models/sketch/weights", {"weights": {"3": 100, "4": 0}}, 0.0),
    ]
    clients = [asyncio.create_task(keep_asking(h)) for h in people]
    phases: list[tuple[float, float, float]] = []
    for method, path, body, canary_share in changes:
        r = await client.request(method, path, json={**body, "reason": "load test"}, headers=admin)
        assert r.status_code == 200, r.text
        begin = loop.time()
        await asyncio.sleep(2.0)
        phases.append((begin, loop.time(), canary_share))
    stop.set()
    await asyncio.gather(*clients)

    assert not errors, errors[:3]
    assert {version for _, version in answers} <= {3, 4}
    for begin, end, expected in phases:
        versions = [version for started, version in answers if begin <= started < end]
        assert len(versions) >= 40, len(versions)
        share = versions.count(4) / len(versions)
        assert abs(share - expected) <= 0.08, (expected, share, len(versions))


async def test_the_cli_changes_the_registry_as_the_api_does(own_stack: Stack, tmp_path: Path) -> None:
    client = own_stack.client
    admin = await login(client, ADMIN_EMAIL, ADMIN_PASSWORD)
    await own_stack.start_workers(1, SERVE_MODELS="sketch")
    settings = own_stack.app.state.settings
    env = {
        **os.environ,
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": settings.redis_url,
        "PYTHONPATH": str(ROOT),
    }

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "api.cli", "registry", *args], env=env, cwd=ROOT, capture_output=True, text=True
        )

    spec = tmp_path / "sketch.yaml"
    spec.write_text(yaml.safe_dump({k: v for k, v in SKETCH_NEW.items() if k != "reason"}))
    done = await asyncio.to_thread(cli, "register", str(spec), "--reason", "from the training run")
    assert done.returncode == 0, done.stderr
    assert "sketch@4\tcanary\tweight 0\tenabled" in done.stdout

    async def served() -> bool:
        models = (await client.get("/v1/models", headers=admin)).json()["data"]
        return "sketch@4" in {m["ref"] for m in models if m["available"]}

    await until(served, 30, "sketch@4 served after the CLI registered it")
    done = await asyncio.to_thread(cli, "weights", "sketch", "3=80", "4=20", "--reason", "canary")
    assert done.returncode == 0, done.stderr
    done = await asyncio.to_thread(cli, "promote", "sketch", "9", "--reason", "no such version")
    assert done.returncode == 1 and "no version 9" in done.stderr
    done = await asyncio.to_thread(cli, "weights", "sketch", "1", "--reason", "typo")
    assert done.returncode == 2 and "VERSION=WEIGHT" in done.stderr
    # A rollback from a version that is not the stable one (another operator's rollback came
    # first) changes nothing.
    done = await asyncio.to_thread(cli, "rollback", "sketch", "--from-version", "4", "--reason", "worse")
    assert done.returncode == 1 and "sketch@4 is no longer the stable version (sketch@3 is)" in done.stderr, done
    history = await asyncio.to_thread(cli, "history", "--model", "sketch")
    lines = [line.split("\t") for line in history.stdout.splitlines()]
    assert [(line[2], line[3], line[5]) for line in lines[:2]] == [
        (f"cli:{getpass.getuser()}", "set_weights", "canary"),
        (f"cli:{getpass.getuser()}", "register", "from the training run"),
    ]

    # A version that knows fewer classes than the stable one (6 against 20) gets traffic only forced.
    async def sketch1_served() -> bool:
        availability = await own_stack.app.state.workers.availability(fresh=True)
        return "sketch@1" in availability and availability["sketch@1"].available

    await until(sketch1_served, 30, "sketch@1 served")
    done = await asyncio.to_thread(cli, "weights", "sketch", "1=90", "3=10", "--reason", "canary")
    assert done.returncode == 1 and "sketch@1 knows 6 classes and the stable sketch@3 20" in done.stderr, done.stderr
    done = await asyncio.to_thread(cli, "weights", "sketch", "1=10", "--reason", "compare", "--force")
    assert done.returncode == 0 and "sketch@1\tcanary\tweight 10" in done.stdout, done.stderr
    # The API process serves what the CLI wrote within its refresh interval.
    registry = own_stack.app.state.live_registry

    async def split_served() -> bool:
        return registry.current.get("sketch@4").traffic_weight == 20

    await until(split_served, 3, "the API serving the CLI's weights")


def _registry_cli(settings: Settings, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m api.cli registry *args`` against ``settings``' database and Redis."""
    environment = {
        **os.environ,
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": settings.redis_url,
        "PYTHONPATH": str(ROOT),
        **env,
    }
    return subprocess.run(
        [sys.executable, "-m", "api.cli", "registry", *args], env=environment, cwd=ROOT, capture_output=True, text=True
    )


def _one_error_line(done: subprocess.CompletedProcess[str], code: int, says: str) -> None:
    """The command failed with ``code`` and said why on one line (no traceback)."""
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    assert says in done.stderr, done.stderr


async def test_weights_the_registry_cannot_hold_are_refused_by_every_caller(
    fresh_settings: Settings, settings: Settings
) -> None:
    await _seed(fresh_settings, load_registry(settings.registry_path))
    # A weight past the registry entries' bound would be stored, then drop the stable version from
    # the live registry; one past PostgreSQL's integer, a traceback; full-width digits are no digits.
    for pair, says in (
        ("3=2000000", "weights are whole numbers from 0 to 1000000"),
        (f"3={MAX_WEIGHT + 1}", "weights are whole numbers from 0 to 1000000"),
        ("3=99999999999", "weights are whole numbers from 0 to 1000000"),
        ("3=１００", "expected VERSION=WEIGHT"),
        ("３=100", "expected VERSION=WEIGHT"),
        ("3=1e3", "expected VERSION=WEIGHT"),
    ):
        done = await asyncio.to_thread(_registry_cli, fresh_settings, "weights", "sketch", pair, "--reason", "typo")
        _one_error_line(done, 2, says)
    # The service refuses them itself, whoever calls it.
    engine = make_engine(fresh_settings)
    try:
        async with make_sessionmaker(engine)() as session:
            for weight in (MAX_WEIGHT + 1, 2**40, -1):
                with pytest.raises(HTTPException) as refused:
                    await service.set_weights(
                        session=session,
                        actor=service.Actor(None, "test"),
                        name="sketch",
                        weights={3: weight},
                        reason="typo",
                        available={"sketch@3"},
                    )
                assert refused.value.status_code == 422 and str(MAX_WEIGHT) in str(refused.value.detail)
                await session.rollback()
    finally:
        await engine.dispose()
    versions, changes = await _rows(fresh_settings)
    assert (versions["sketch@3"].channel, versions["sketch@3"].weight) == ("stable", 100)
    assert not [c for c in changes if c.action == "set_weights"]
    # The largest weight is one an entry holds.
    done = await asyncio.to_thread(
        _registry_cli, fresh_settings, "weights", "sketch", f"3={MAX_WEIGHT}", "--reason", "at the bound"
    )
    assert done.returncode == 0 and f"sketch@3\tstable\tweight {MAX_WEIGHT}" in done.stdout, done.stderr


async def test_the_cli_registers_as_the_api_does(fresh_settings: Settings, settings: Settings, tmp_path: Path) -> None:
    await _seed(fresh_settings, load_registry(settings.registry_path))
    entry = {k: v for k, v in SKETCH_NEW.items() if k != "reason"}

    def register(spec: dict[str, Any], name: str = "sketch.yaml") -> subprocess.CompletedProcess[str]:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(spec))
        return _registry_cli(fresh_settings, "register", str(path), "--reason", "retrained")

    # What the API refuses (422), the CLI refuses: a key it does not know, a version past the cap
    # (no next number would be left for the model's runs and registrations), a stable channel.
    done = await asyncio.to_thread(register, {**entry, "weight": 50})
    _one_error_line(done, 2, "weight: Extra inputs are not permitted")
    # Inside the input too: a misspelt mode was dropped, and the version fed RGB images.
    done = await asyncio.to_thread(register, {**entry, "input": {"height": 28, "width": 28, "mdoe": "L"}})
    _one_error_line(done, 2, "input.mdoe: Extra inputs are not permitted")
    done = await asyncio.to_thread(register, {**entry, "version": 2**31 - 1})
    _one_error_line(done, 2, f"version: Input should be less than or equal to {MAX_VERSION}")
    done = await asyncio.to_thread(register, {**entry, "channel": "stable"})
    _one_error_line(done, 2, "channel")
    done = await asyncio.to_thread(register, {**entry, "reason": "in the file"})
    _one_error_line(done, 2, "--reason")
    # So does the service itself, whoever calls it.
    engine = make_engine(fresh_settings)
    try:
        async with make_sessionmaker(engine)() as session:
            spec = {**entry, "version": MAX_VERSION + 1, "channel": "canary"}
            with pytest.raises(HTTPException) as refused:
                await service.register_version(
                    session=session,
                    actor=service.Actor(None, "test"),
                    entry=ModelEntry.model_validate(spec),
                    reason="typo",
                )
            assert refused.value.status_code == 422 and str(MAX_VERSION) in str(refused.value.detail)
    finally:
        await engine.dispose()
    versions, _ = await _rows(fresh_settings)
    assert sorted(k for k in versions if k.startswith("sketch@")) == ["sketch@1", "sketch@2", "sketch@3"]

    # Three operators registering at once without a number get the next free one each.
    done_all = await asyncio.gather(
        *(asyncio.to_thread(register, entry, f"sketch{i}.yaml") for i in range(3)),
    )
    assert [d.returncode for d in done_all] == [0, 0, 0], [d.stderr for d in done_all]
    versions, _ = await _rows(fresh_settings)
    assert {"sketch@4", "sketch@5", "sketch@6"} <= set(versions)
    assert all((versions[f"sketch@{v}"].channel, versions[f"sketch@{v}"].weight) == ("canary", 0) for v in (4, 5, 6))
    # A number the file gives is kept.
    done = await asyncio.to_thread(register, {**entry, "version": 10})
    assert done.returncode == 0 and "sketch@10\tcanary\tweight 0" in done.stdout, done.stderr


async def test_the_cli_says_in_one_line_what_it_cannot_read_or_reach(settings: Settings, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [sketch\n")
    done = await asyncio.to_thread(_registry_cli, settings, "register", str(bad), "--reason", "x")
    _one_error_line(done, 2, "not valid YAML (line 2")
    done = await asyncio.to_thread(_registry_cli, settings, "register", str(tmp_path / "none.yaml"), "--reason", "x")
    _one_error_line(done, 2, "No such file or directory")
    no_database = settings.database_url.rsplit("@", 1)[0] + "@127.0.0.1:1/portal"
    done = await asyncio.to_thread(_registry_cli, settings, "list", DATABASE_URL=no_database)
    _one_error_line(done, 1, "the database cannot be used")
    assert "127.0.0.1" in done.stderr and no_database.rsplit("@", 1)[0] not in done.stderr, "no credentials"
    done = await asyncio.to_thread(
        _registry_cli, settings, "weights", "sketch", "3=100", "--reason", "x", REDIS_URL="redis://127.0.0.1:1/0"
    )
    _one_error_line(done, 1, "Redis cannot be used")


async def test_a_shadow_answers_copies_that_are_stored_and_never_returned(own_stack: Stack) -> None:
    client = own_stack.client
    admin = await login(client, ADMIN_EMAIL, ADMIN_PASSWORD)
    await own_stack.start_workers(1, SERVE_MODELS="sketch")
    r = await client.post("/v1/admin/registry/versions", json={**SKETCH_NEW, "channel": "shadow"}, headers=admin)
    assert r.status_code == 201, r.text

    async def shadow_served() -> bool:
        return "sketch@4" in {
            key
            for key, state in (await own_stack.app.state.workers.availability(fresh=True)).items()
            if state.available
        }

    await until(shadow_served, 30, "the shadow loaded")
    listed = (await client.get("/v1/models", headers=admin)).json()["data"]
    assert "sketch@4" not in {m["ref"] for m in listed}, "a shadow is not offered to users"
    _, user = await users_of(client, admin)
    pinned = await client.post(
        "/model/predict", params={"models": "sketch@4"}, files={"file": ("d.png", drawing())}, headers=user
    )
    assert pinned.status_code == 422 and "Unknown model 'sketch@4'" in pinned.text, "nor answers one who names it"
    job_ids = []
    for _ in range(5):
        r = await client.post(
            "/model/predict", params={"models": "sketch"}, files={"file": ("d.png", drawing())}, headers=user
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["version"] == 3 and list(body["results"]) == ["sketch@3"]
        job_ids.append(body["job_id"])
        job = (await client.get(f"/v1/predictions/{body['job_id']}", headers=user)).json()
        assert [(p["model"], p["version"]) for p in job["results"]] == [("sketch", 3)]

    async def shadows_done() -> bool:
        async with own_stack.app.state.read_sessionmaker() as session:
            rows = list(await session.scalars(select(ShadowPrediction)))
        return len(rows) == 5 and all(r.status == "done" and r.label for r in rows)

    await until(shadows_done, 20, "five shadow answers stored")
    r = await client.get(
        "/v1/admin/registry/models/sketch/compare", params={"candidate": 4, "baseline": 3}, headers=admin
    )
    agreement = r.json()["shadow_agreement"]

    async def agreement_exported() -> bool:
        samples = await scrape(client)
        return value(samples, "portal_shadow_answers", model="sketch", version="4") == 5 and value(
            samples, "portal_shadow_agreement", model="sketch", version="4"
        ) == pytest.approx(agreement)

    await until(agreement_exported, 10, "the shadow's agreement exported")
    async with own_stack.app.state.read_sessionmaker() as session:
        rows = list(await session.scalars(select(ShadowPrediction)))
    assert {str(r.job_id) for r in rows} == set(job_ids)
    assert all((r.model_name, r.model_version) == ("sketch", 4) and r.inference_ms for r in rows)
    # Not in any listing either.
    listing = (await client.get("/v1/predictions", headers=user)).json()
    assert all(p["version"] == 3 for j in listing["data"] for p in j["results"])

    # A copy never answered (lost with Redis's data) expires with its job's deadline.
    async with own_stack.app.state.sessionmaker() as session:
        await session.execute(update(ShadowPrediction).where(ShadowPrediction.id == rows[0].id).values(status="queued"))
        await session.execute(
            update(Job).where(Job.id == rows[0].job_id).values(deadline_at=datetime.now(UTC) - timedelta(minutes=1))
        )
        await session.commit()
        await predictions_service.expire_overdue(session=session, grace_seconds=0)
        expired = await session.scalar(select(ShadowPrediction.status).where(ShadowPrediction.id == rows[0].id))
    assert expired == "expired"


async def users_of(client: httpx.AsyncClient, admin: dict[str, str]) -> tuple[str, dict[str, str]]:
    email, password = await _new_user(client, admin)
    return email, await login(client, email, password)


async def test_promotion_compares_first_and_is_refused_when_worse_unless_forced(own_stack: Stack) -> None:
    client = own_stack.client
    admin = await login(client, ADMIN_EMAIL, ADMIN_PASSWORD)
    await own_stack.start_workers(1, SERVE_MODELS="sketch")

    async def both() -> bool:
        availability = await own_stack.app.state.workers.availability(fresh=True)
        return all(key in availability and availability[key].available for key in ("sketch@1", "sketch@2", "sketch@3"))

    await until(both, 60, "the sketch versions served")
    compare = "/v1/admin/registry/models/sketch/compare"
    # A 6-class version against the 20-class stable one: its higher held-out accuracy (a 6-way
    # choice) is not compared, and knowing fewer classes is worse: promoting it needs force.
    r = await client.get(compare, params={"candidate": 1}, headers=admin)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["candidate"]["classes"], body["baseline"]["classes"], body["verdict"]) == (6, 20, "worse"), body
    assert any(reason.startswith("classes: 6 against 20 (worse") for reason in body["reasons"]), body
    assert not any(
        reason.startswith("held-out accuracy: ") and " % against " in reason for reason in body["reasons"]
    ), body
    refused = await client.post(
        "/v1/admin/registry/models/sketch/versions/1/promote", json={"reason": "higher accuracy"}, headers=admin
    )
    assert refused.status_code == 409 and "classes: 6 against 20" in refused.json()["detail"], refused.text
    # The two 6-class versions are compared here: the first becomes the stable one in place of the
    # 20-class version (forced: whatever their held-out accuracies, measured on different labels).
    r = await client.post(
        "/v1/admin/registry/models/sketch/versions/1/promote",
        json={"reason": "compare the 6-class versions", "force": True},
        headers=admin,
    )
    assert r.status_code == 200, r.text
    # The other way round, more classes are no evidence either way: left to the other numbers.
    body = (await client.get(compare, params={"candidate": 3}, headers=admin)).json()
    assert body["verdict"] == "no_evidence" and "knows 20 classes" in body["reasons"][0], body
    r = await client.get(compare, params={"candidate": 2}, headers=admin)
    assert r.status_code == 200, r.text
    body = r.json()
    # The training records of the two versions (metrics.json beside each model file).
    records = {
        v: json.loads(
            (Path(os.environ.get("TRAINED_DIR", ROOT / "var" / "trained")) / f"sketch/v{v}/metrics.json").read_text()
        )
        for v in (1, 2)
    }
    assert body["baseline"]["version"] == 1 and body["candidate"]["version"] == 2
    assert body["candidate"]["heldout_accuracy"] == records[2]["test_accuracy"]
    assert body["baseline"]["heldout_accuracy"] == records[1]["test_accuracy"]
    better = records[2]["test_accuracy"] >= records[1]["test_accuracy"]
    assert body["verdict"] == "not_worse" if better else body["verdict"] in ("worse", "not_worse")
    assert any("held-out accuracy" in reason for reason in body["reasons"])
    assert (await client.get(compare, params={"candidate": 1}, headers=admin)).status_code == 409
    assert (await client.get(compare, params={"candidate": 9}, headers=admin)).status_code == 404

    # The lower of the two becomes the candidate against the higher, with no margin to spare.
    high, low = (2, 1) if better else (1, 2)
    promote = "/v1/admin/registry/models/sketch/versions/{}/promote"
    if high != 1:
        r = await client.post(promote.format(high), json={"reason": "higher held-out accuracy"}, headers=admin)
        assert r.status_code == 200, r.text
    own_stack.app.state.settings = own_stack.app.state.settings.model_copy(update={"promotion_margin": 0.0})
    refused = await client.post(promote.format(low), json={"reason": "try"}, headers=admin)
    assert refused.status_code == 409 and "held-out accuracy" in refused.json()["detail"], refused.text
    forced = await client.post(promote.format(low), json={"reason": "needed for a demo", "force": True}, headers=admin)
    assert forced.status_code == 200, forced.text
    changes = (await client.get("/v1/admin/registry/changes", params={"model": "sketch"}, headers=admin)).json()
    latest = changes["data"][0]
    assert latest["action"] == "promote" and latest["version"] == low
    assert latest["reason"].startswith("needed for a demo [forced past the comparison: held-out accuracy")


async def test_a_change_reads_the_rows_it_locks_afresh(own_stack: Stack) -> None:
    """A session that loaded the model's rows before another admin's promotion (as the auto-promote
    rule keeps them across its comparison) must see that promotion once it locks them: promoting
    from stale rows left two stable versions, both with all the stable traffic."""
    from sqlalchemy import select

    from api.app.registry import service as registry_service
    from api.app.registry.models import ModelVersion

    sessions = own_stack.app.state.sessionmaker
    every = {"sketch@1", "sketch@2", "sketch@3"}
    async with sessions() as early, sessions() as other:
        # Loaded, and kept in its identity map, in a transaction still open.
        kept = list(await early.scalars(select(ModelVersion).where(ModelVersion.name == "sketch")))
        assert kept
        for session, admin, version in ((other, "admin a", 2), (early, "admin b", 1)):
            await registry_service.promote(
                session=session,
                actor=registry_service.Actor(None, admin),
                name="sketch",
                version=version,
                reason=admin,
                available=every,
            )
    async with sessions() as session:
        rows = {
            r.version: (r.channel, r.weight)
            for r in await session.scalars(select(ModelVersion).where(ModelVersion.name == "sketch"))
        }
    assert [v for v, (channel, _) in rows.items() if channel == "stable"] == [1], rows


SKETCH_6 = ["apple", "bicycle", "cat", "diamond", "eye", "fish"]
SKETCH_20 = str((load_registry(ROOT / "model" / "registry.yaml").get("sketch@3").training or {})["categories"]).split(
    ","
)


async def test_weights_refuse_a_version_that_knows_fewer_classes_unless_forced(
    own_stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """90 % of the traffic to sketch@1 (6 classes) over the stable sketch@3 (20) answered a star
    "cat": weights follow promotion's rule, and name what the version lacks."""
    from api.app.catalog import service as catalog

    async def availability(self: Any, *, fresh: bool = False) -> dict[str, catalog.ModelAvailability]:
        return {
            "sketch@1": catalog.ModelAvailability(workers=1, num_classes=6),
            "sketch@2": catalog.ModelAvailability(workers=1, num_classes=6),
            "sketch@3": catalog.ModelAvailability(workers=1, num_classes=20),
        }

    monkeypatch.setattr(catalog.WorkerDirectory, "availability", availability)
    client = own_stack.client
    admin = await login(client, ADMIN_EMAIL, ADMIN_PASSWORD)
    weights = "/v1/admin/registry/models/sketch/weights"
    canary = {"weights": {"1": 90, "3": 10}, "reason": "canary"}

    refused = await client.put(weights, json=canary, headers=admin)
    assert refused.status_code == 409, refused.text
    assert "sketch@1 knows 6 classes and the stable sketch@3 20" in refused.json()["detail"], refused.text
    assert "the other 14 would get a wrong answer" in refused.json()["detail"]
    # With the labels the workers published, the ones it lacks are named.
    async with own_stack.app.state.sessionmaker() as session:
        for version, labels in ((1, SKETCH_6), (2, SKETCH_6), (3, SKETCH_20)):
            await session.execute(
                update(ModelVersion)
                .where(ModelVersion.name == "sketch", ModelVersion.version == version)
                .values(labels=labels)
            )
        await session.commit()
    refused = await client.put(weights, json={"weights": {"1": 10}, "reason": "canary"}, headers=admin)
    assert refused.status_code == 409 and "it lacks airplane, banana, bird" in refused.json()["detail"], refused.text
    assert "and 4 more" in refused.json()["detail"] and "star" not in refused.json()["detail"]
    # Nothing was changed; the stable version's own weight needs no force.
    r = await client.put(weights, json={"weights": {"3": 50}, "reason": "halve"}, headers=admin)
    assert r.status_code == 200, r.text

    # Forced, it is done, and the audit trail says what was forced past.
    forced = await client.put(weights, json={**canary, "force": True}, headers=admin)
    assert forced.status_code == 200, forced.text
    assert {v["version"]: v["weight"] for v in forced.json()["versions"]}[1] == 90
    latest = (await client.get("/v1/admin/registry/changes", params={"model": "sketch"}, headers=admin)).json()
    assert latest["data"][0]["reason"].startswith("canary [forced past the classes: sketch@1 knows 6 classes")
    r = await client.put(weights, json={"weights": {"1": 0}, "reason": "undo"}, headers=admin)
    assert r.status_code == 200, r.text

    # A shadow takes no traffic of its own: not refused.
    r = await client.patch(
        "/v1/admin/registry/models/sketch/versions/2", json={"channel": "shadow", "reason": "watch"}, headers=admin
    )
    assert r.status_code == 200, r.text
    # A canary with as many classes as the stable one, or more, needs no force.
    async with own_stack.app.state.sessionmaker() as session:
        await service.promote(
            session=session,
            actor=service.Actor(None, ADMIN_EMAIL),
            name="sketch",
            version=1,
            reason="x",
            available={"sketch@1"},
        )
    r = await client.patch(
        "/v1/admin/registry/models/sketch/versions/2", json={"channel": "canary", "reason": "back"}, headers=admin
    )
    assert r.status_code == 200, r.text
    r = await client.put(weights, json={"weights": {"2": 10, "3": 10}, "reason": "canaries"}, headers=admin)
    assert r.status_code == 200, r.text
    # sketch@1 took over sketch@3's weight (10) when promoted: the three now have a third each.
    assert {v["version"]: v["weight"] for v in r.json()["versions"]} == {1: 10, 2: 10, 3: 10}


async def test_changes_to_two_models_commit_in_the_order_of_their_revisions(own_stack: Stack) -> None:
    """The revision is the newest change's id, given when its row is written: a change to another
    model that wrote its row later but committed first made a process read that higher revision
    and never read the earlier change (weights 40 s out of date until the next change). A change
    now waits for the registry's lock until the one before it commits."""
    from api.app.registry import service as registry_service

    sessions = own_stack.app.state.sessionmaker
    every = {"sketch@1", "sketch@2", "sketch@3", "mobilenet_v2@1", "mobilenet_v2@2"}
    admin = registry_service.Actor(None, "admin")
    async with sessions() as first, sessions() as second:
        # A change to sketch, its row written (its id given) and not yet committed.
        await registry_service._lock_model(first, "sketch")
        registry_service._audit(
            first, actor=admin, action="weights", model="sketch", version=None, before={}, after={}, reason="first"
        )
        await first.flush()
        later = asyncio.create_task(
            registry_service.set_weights(
                session=second, actor=admin, name="mobilenet_v2", weights={1: 63}, reason="second", available=every
            )
        )
        await asyncio.sleep(1.0)
        assert not later.done(), "a change to another model committed before an earlier one"
        await first.commit()
        await asyncio.wait_for(later, 30)
    async with sessions() as session:
        changes = await session.execute(
            select(RegistryChange.reason, RegistryChange.id).where(RegistryChange.reason.in_(["first", "second"]))
        )
        ids = dict(changes.all())
    assert ids["first"] < ids["second"], ids


DOODLE = {
    "name": "doodle",
    "runtime": "keras",
    "file": "{trained_dir}/sketch/v3/model.keras",
    "labels": "{trained_dir}/sketch/v3/labels.txt",
    "input": {"height": 28, "width": 28, "mode": "L"},
    "preprocessing": "sketch",
    "reason": "new",
}
"""A model new to the registry, registered through the API: sketch@3's files under another name."""


async def test_a_new_models_first_version_is_promoted_without_a_comparison(own_stack: Stack) -> None:
    """A model registered through the API has canaries alone. None of them answers its bare name
    (at weight 0, as any new version) or gets a weight; they can be shadowed, disabled and
    retired; the first one is promoted without a comparison (nothing to compare with is no
    evidence against it), and that promotion is not rolled back: the model would have no stable
    version left."""
    client = own_stack.client
    admin = await login(client, ADMIN_EMAIL, ADMIN_PASSWORD)
    user = await login(client, *(await _new_user(client, admin)))
    # A key the input does not know is refused, named, not dropped (the mode would be RGB).
    typo = {**DOODLE, "input": {"height": 28, "width": 28, "mdoe": "L"}}
    r = await client.post("/v1/admin/registry/versions", json=typo, headers=admin)
    assert r.status_code == 422 and "mdoe" in r.text, r.text
    for version in (1, 2):
        r = await client.post("/v1/admin/registry/versions", json=DOODLE, headers=admin)
        assert r.status_code == 201, r.text
        assert (r.json()["version"], r.json()["channel"], r.json()["weight"]) == (version, "canary", 0), r.text
        assert r.json()["spec"]["input"]["mode"] == "L"
    await own_stack.start_workers(1, SERVE_MODELS="doodle")

    async def served() -> bool:
        availability = await own_stack.app.state.workers.availability(fresh=True)
        return all(key in availability and availability[key].available for key in ("doodle@1", "doodle@2"))

    await until(served, 60, "doodle@1 and @2 served")

    async def predict(ref: str) -> httpx.Response:
        return await client.post(
            "/model/predict", params={"models": ref}, files={"file": ("d.png", drawing())}, headers=user
        )

    # Its name alone reaches no canary at weight 0; a version named answers, as any canary does.
    r = await predict("doodle")
    assert r.status_code == 422 and r.json()["detail"].startswith("Unknown model 'doodle'"), r.text
    r = await predict("doodle@1")
    assert r.status_code == 200 and r.json()["version"] == 1, r.text

    model = "/v1/admin/registry/models/doodle"
    r = await client.put(f"{model}/weights", json={"weights": {"1": 100}, "reason": "x"}, headers=admin)
    assert r.status_code == 409, r.text
    assert "doodle@1 cannot get traffic: doodle has no enabled stable version with traffic yet" in r.json()["detail"]
    r = await client.get(f"{model}/compare", params={"candidate": 1}, headers=admin)
    assert r.status_code == 409 and "has no enabled stable version to compare doodle@1 with" in r.text, r.text
    for change in ({"channel": "shadow"}, {"channel": "canary"}, {"enabled": False}, {"channel": "retired"}):
        r = await client.patch(f"{model}/versions/2", json={**change, "reason": "x"}, headers=admin)
        assert r.status_code == 200, (change, r.text)

    r = await client.post(f"{model}/versions/1/promote", json={"reason": "first"}, headers=admin)
    assert r.status_code == 200, r.text
    states = {v["version"]: (v["channel"], v["weight"], v["enabled"]) for v in r.json()["versions"]}
    assert states == {1: ("stable", 100, True), 2: ("retired", 0, False)}, states
    changes = (await client.get("/v1/admin/registry/changes", params={"model": "doodle"}, headers=admin)).json()
    assert changes["data"][0]["action"] == "promote"
    assert changes["data"][0]["reason"] == "first [not compared: doodle had no enabled stable version to compare with]"
    r = await predict("doodle")
    assert r.status_code == 200 and r.json()["version"] == 1, r.text

    # From now on it keeps a stable version, as every model does.
    r = await client.post(f"{model}/rollback", json={"reason": "undo", "from_version": 1}, headers=admin)
    assert r.status_code == 409 and "doodle@1 was doodle's first stable version" in r.json()["detail"], r.text
    r = await client.patch(f"{model}/versions/1", json={"channel": "retired", "reason": "x"}, headers=admin)
    assert r.status_code == 409 and "would have no enabled stable version" in r.json()["detail"], r.text


async def test_a_version_that_failed_to_load_is_refused_saying_so(own_stack: Stack, tmp_path: Path) -> None:
    """A version every worker serving its model failed to load is not loaded by retrying: a change
    that would give it traffic says it failed to load, with the error, not "retry once it is"."""
    trained = tmp_path / "trained"
    (trained / "broken").mkdir(parents=True)
    (trained / "broken" / "model.keras").write_bytes(b"not a keras archive")
    (trained / "broken" / "labels.txt").write_text("\n".join(SKETCH_20) + "\n")
    client = own_stack.client
    admin = await login(client, ADMIN_EMAIL, ADMIN_PASSWORD)
    broken = {**SKETCH_NEW, "file": "{trained_dir}/broken/model.keras", "labels": "{trained_dir}/broken/labels.txt"}
    r = await client.post("/v1/admin/registry/versions", json=broken, headers=admin)
    assert r.status_code == 201 and r.json()["version"] == 4, r.text
    await own_stack.start_workers(1, SERVE_MODELS="sketch@4", TRAINED_DIR=str(trained))
    workers = own_stack.app.state.workers

    async def failed() -> bool:
        state = (await workers.availability(fresh=True)).get("sketch@4")
        return state is not None and bool(state.reasons)

    await until(failed, 60, "sketch@4 reported failing to load")
    failure = "it failed to load on every live worker serving sketch (model file "
    r = await client.post(
        "/v1/admin/registry/models/sketch/versions/4/promote", json={"reason": "x", "force": True}, headers=admin
    )
    assert r.status_code == 409, r.text
    assert r.json()["detail"].startswith(f"sketch@4 cannot be promoted: {failure}"), r.text
    assert "no Keras archive" in r.json()["detail"] and "retry once it is" not in r.json()["detail"]

    # Weights and shadow traffic say the same, through the API and the CLI.
    r = await client.put(
        "/v1/admin/registry/models/sketch/weights", json={"weights": {"4": 10}, "reason": "x"}, headers=admin
    )
    assert r.status_code == 409 and r.json()["detail"].startswith(f"sketch@4 cannot get traffic: {failure}"), r.text
    r = await client.patch(
        "/v1/admin/registry/models/sketch/versions/4", json={"channel": "shadow", "reason": "x"}, headers=admin
    )
    assert r.status_code == 409 and r.json()["detail"].startswith(f"sketch@4 cannot shadow traffic: {failure}"), r.text
    settings = own_stack.app.state.settings
    done = await asyncio.to_thread(_registry_cli, settings, "weights", "sketch", "4=10", "--reason", "x")
    _one_error_line(done, 1, f"sketch@4 cannot get traffic: {failure}")
    done = await asyncio.to_thread(_registry_cli, settings, "channel", "sketch", "4", "shadow", "--reason", "x")
    _one_error_line(done, 1, f"sketch@4 cannot shadow traffic: {failure}")


def test_a_load_failure_is_said_once_every_worker_serving_the_model_reported_it() -> None:
    """A worker still loading a version reports nothing of it yet: until as many workers as serve
    the model reported it failed, it may still load, and "retry once it is" stays the answer."""
    from api.app.catalog.service import ModelAvailability
    from contracts.messages import FAILED_TO_LOAD, NOT_TRAINED_YET

    failed = f"{FAILED_TO_LOAD}: model file /m/4.keras could not be loaded"
    served = ModelAvailability(workers=2, num_classes=20)
    assert (
        service.load_failure("sketch@4", {"sketch@3": served, "sketch@4": ModelAvailability(reasons=[failed])}) is None
    )
    both = {"sketch@3": served, "sketch@4": ModelAvailability(reasons=[failed, failed])}
    assert service.load_failure("sketch@4", both) == "model file /m/4.keras could not be loaded"
    # Another reason than a failed load (its file not written yet) may still change.
    other = ModelAvailability(reasons=[failed, f"{NOT_TRAINED_YET}: /m/4.keras"])
    assert service.load_failure("sketch@4", {"sketch@3": served, "sketch@4": other}) is None
    # Loaded anywhere: no failure.
    assert service.load_failure("sketch@4", {"sketch@4": ModelAvailability(workers=1, reasons=[failed])}) is None
