"""The model registry as live data: seeded from registry.yaml, audited, read by admins."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
from sqlalchemy import select

from api.app.core.config import Settings
from api.app.core.db import make_engine, make_sessionmaker
from api.app.registry import service
from api.app.registry.models import ModelVersion, RegistryChange
from api.prestart import migrate
from contracts.registry import Registry, load_registry
from tests.conftest import Users, _execute


@pytest.fixture
async def fresh_settings(settings: Settings) -> AsyncIterator[Settings]:
    """A database of its own, migrated and empty: seeding is tested from the start."""
    name = f"portal_registry_{uuid.uuid4().hex[:8]}"
    await _execute(f'CREATE DATABASE "{name}"')
    url = settings.database_url.rsplit("/", 1)[0] + f"/{name}"
    await asyncio.to_thread(migrate, url)
    try:
        yield settings.model_copy(update={"database_url": url})
    finally:
        await _execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


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
    assert (versions["sketch@1"].channel, versions["sketch@1"].weight) == ("stable", 100)
    assert sketch2.spec["file"] == "{trained_dir}/sketch/v2/model.keras" and "channel" not in sketch2.spec
    assert sketch2.display_name == "sketch@2"

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
    assert last.before["spec"]["description"] != "retrained" == last.after["spec"]["description"]


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
    assert changes["count"] == 2 and {c["version"] for c in changes["data"]} == {1, 2}
    assert all(c["actor"] == "registry.yaml" and c["action"] == "register" for c in changes["data"])
    assert changes["data"][0]["id"] > changes["data"][1]["id"]  # newest first

    _, headers = await users.create()
    assert (await client.get("/v1/admin/registry", headers=headers)).status_code == 403
    assert (await client.get("/v1/admin/registry/changes", headers=headers)).status_code == 403
    bad = await client.get("/v1/admin/registry/changes", params={"model": "a\x00b"}, headers=admin_headers)
    assert bad.status_code == 422
