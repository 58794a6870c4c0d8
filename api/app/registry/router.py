from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query
from pydantic import ValidationError

from api.app.core.fields import INT32_MAX
from api.app.core.responses import ADMIN, BODY, CONFLICT, INVALID, NOT_FOUND
from api.app.deps import AdminUser, LiveRegistryDep, PageDep, ReadSessionDep, RedisDep, SessionDep, WorkersDep
from api.app.registry import service
from api.app.registry.schemas import (
    ModelVersionPublic,
    ModelVersionsPublic,
    RegistryChangePublic,
    RegistryChangesPublic,
    RegistryPublic,
    RollbackBody,
    VersionCreate,
    VersionUpdate,
    WeightsUpdate,
)
from contracts.registry import ModelEntry

router = APIRouter(prefix="/v1/admin/registry", tags=["registry"])

ModelName = Annotated[str, Path(pattern=r"^[a-z0-9_]+$", max_length=64)]
Version = Annotated[int, Path(ge=1, le=INT32_MAX)]
CHANGE = {**ADMIN, **NOT_FOUND, **CONFLICT, **BODY}


@router.get("", response_model=RegistryPublic, responses=ADMIN)
async def read_registry(_: AdminUser, session: ReadSessionDep) -> RegistryPublic:
    """Every model version with its state (channel, enabled, traffic weight) and spec (admin)."""
    versions = await service.list_versions(session=session)
    return RegistryPublic(
        revision=await service.revision(session=session),
        versions=[ModelVersionPublic.model_validate(v) for v in versions],
    )


@router.get("/changes", response_model=RegistryChangesPublic, responses={**ADMIN, **INVALID})
async def list_registry_changes(
    _: AdminUser,
    session: ReadSessionDep,
    page: PageDep,
    model: Annotated[str | None, Query(max_length=64, pattern=r"^[a-z0-9_]+$")] = None,
) -> RegistryChangesPublic:
    """The registry's audit trail, newest first: who changed what, when and why (admin)."""
    rows, count = await service.list_changes(session=session, model=model, skip=page.skip, limit=page.limit)
    return RegistryChangesPublic(data=[RegistryChangePublic.model_validate(r) for r in rows], count=count)


async def _answer(
    session: SessionDep, redis: RedisDep, live: LiveRegistryDep, name: str, changed: service.Changed
) -> ModelVersionsPublic:
    await live.reload(session, redis)
    return ModelVersionsPublic(
        name=name,
        revision=changed.revision,
        versions=[ModelVersionPublic.model_validate(r) for r in changed.versions],
    )


def _available(availability: Mapping[str, service.WorkerReport]) -> set[str]:
    return {key for key, state in availability.items() if state.available}


@router.post("/versions", response_model=ModelVersionPublic, status_code=201, responses=CHANGE)
async def register_version(
    body: VersionCreate, admin: AdminUser, session: SessionDep, redis: RedisDep, live: LiveRegistryDep
) -> ModelVersionPublic:
    """Register a new version (a canary without traffic, or a shadow); workers load it within seconds (admin)."""
    spec = body.model_dump(exclude={"reason", "version"})
    # Without a number, the next one now; register_version takes the next free one under its lock.
    version = body.version or await service.next_version(session=session, name=body.name)
    try:
        entry = ModelEntry.model_validate({**spec, "version": version})
    except ValidationError as exc:
        raise HTTPException(status_code=422, detail=str(exc.errors()[0]["msg"])) from None
    row = await service.register_version(
        session=session,
        actor=service.Actor(admin.id, admin.email),
        entry=entry,
        reason=body.reason,
        next_free=body.version is None,
    )
    await live.reload(session, redis)
    return ModelVersionPublic.model_validate(row)


@router.put("/models/{name}/weights", response_model=ModelVersionsPublic, responses=CHANGE)
async def set_weights(
    name: ModelName,
    body: WeightsUpdate,
    admin: AdminUser,
    session: SessionDep,
    redis: RedisDep,
    workers: WorkersDep,
    live: LiveRegistryDep,
) -> ModelVersionsPublic:
    """Set the traffic weights of a model's versions, e.g. {"1": 90, "2": 10}; force: even to fewer classes (admin)."""
    availability = await workers.availability(fresh=True)
    changed = await service.set_weights(
        session=session,
        actor=service.Actor(admin.id, admin.email),
        name=name,
        weights=body.weights,
        reason=body.reason,
        available=_available(availability),
        classes={key: state.num_classes for key, state in availability.items() if state.available},
        force=body.force,
        reported=availability,
    )
    return await _answer(session, redis, live, name, changed)


@router.patch("/models/{name}/versions/{version}", response_model=ModelVersionsPublic, responses=CHANGE)
async def update_version(
    name: ModelName,
    version: Version,
    body: VersionUpdate,
    admin: AdminUser,
    session: SessionDep,
    redis: RedisDep,
    workers: WorkersDep,
    live: LiveRegistryDep,
) -> ModelVersionsPublic:
    """Put a version in shadow, back to canary or retire it; enable or disable it (admin)."""
    availability = await workers.availability(fresh=True)
    changed = await service.set_channel(
        session=session,
        actor=service.Actor(admin.id, admin.email),
        name=name,
        version=version,
        channel=body.channel,
        enabled=body.enabled,
        reason=body.reason,
        available=_available(availability),
        reported=availability,
    )
    return await _answer(session, redis, live, name, changed)


@router.post("/models/{name}/rollback", response_model=ModelVersionsPublic, responses=CHANGE)
async def rollback_model(
    name: ModelName,
    body: RollbackBody,
    admin: AdminUser,
    session: SessionDep,
    redis: RedisDep,
    workers: WorkersDep,
    live: LiveRegistryDep,
) -> ModelVersionsPublic:
    """Undo the model's latest promotion in one call: the previous stable version back (admin).
    With ``from_version``, 409 unless that version is the stable one when the rollback is made."""
    availability = await workers.availability(fresh=True)
    changed = await service.rollback(
        session=session,
        actor=service.Actor(admin.id, admin.email),
        name=name,
        reason=body.reason,
        from_version=body.from_version,
        available=_available(availability),
        reported=availability,
    )
    return await _answer(session, redis, live, name, changed)
