from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from api.app.core.responses import ADMIN, INVALID
from api.app.deps import AdminUser, PageDep, ReadSessionDep
from api.app.registry import service
from api.app.registry.schemas import (
    ModelVersionPublic,
    RegistryChangePublic,
    RegistryChangesPublic,
    RegistryPublic,
)

router = APIRouter(prefix="/v1/admin/registry", tags=["registry"])


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
