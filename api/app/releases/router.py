from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, status

from api.app.catalog.service import weight_shares
from api.app.core.fields import INT32_MAX
from api.app.core.responses import ADMIN, BODY, BODY_TOO_LARGE, CONFLICT, INVALID, NOT_FOUND
from api.app.deps import AdminUser, LiveRegistryDep, ReadSessionDep, RedisDep, SessionDep, SettingsDep, WorkersDep
from api.app.predictions.schemas import EvaluationPublic
from api.app.registry import service as registry_service
from api.app.registry.router import ModelName, Version
from api.app.registry.schemas import ModelVersionPublic, ModelVersionsPublic
from api.app.releases import service
from api.app.releases.schemas import Comparison, EvaluationRequest, Promotion, ServingPublic

router = APIRouter(prefix="/v1/admin/registry", tags=["registry"])


@router.get("/serving", response_model=ServingPublic, responses=ADMIN)
async def serving_versions(
    _: AdminUser, session: ReadSessionDep, workers: WorkersDep, live: LiveRegistryDep, settings: SettingsDep
) -> ServingPublic:
    """Every version with its state, weight and share, workers, memory and accuracies: the Models tab (admin)."""
    return ServingPublic(
        revision=live.revision,
        versions=await service.serving(
            session=session,
            availability=await workers.availability(fresh=True),
            shares=weight_shares(live.current, benchmark_mode=settings.benchmark_mode),
        ),
    )


@router.get(
    "/models/{name}/compare", response_model=Comparison, responses={**ADMIN, **NOT_FOUND, **CONFLICT, **INVALID}
)
async def compare_versions(
    name: ModelName,
    _: AdminUser,
    session: ReadSessionDep,
    workers: WorkersDep,
    settings: SettingsDep,
    candidate: Annotated[int, Query(ge=1, le=INT32_MAX)],
    baseline: Annotated[int | None, Query(ge=1, le=INT32_MAX, description="default: the stable version")] = None,
    days: Annotated[int, Query(ge=1, le=365)] = 7,
) -> Comparison:
    """A candidate version against the stable one: accuracies, traffic, shadow agreement, verdict (admin)."""
    return await service.compare(
        session=session,
        name=name,
        candidate=candidate,
        baseline=baseline,
        availability=await workers.availability(fresh=True),
        margin=settings.promotion_margin,
        days=days,
    )


@router.post(
    "/models/{name}/evaluations",
    response_model=EvaluationPublic,
    status_code=status.HTTP_202_ACCEPTED,
    responses={**ADMIN, **NOT_FOUND, **CONFLICT, **BODY},
)
async def start_evaluation(
    name: ModelName,
    body: EvaluationRequest,
    admin: AdminUser,
    session: SessionDep,
    workers: WorkersDep,
    settings: SettingsDep,
) -> EvaluationPublic:
    """Run a candidate and the stable version (or ``baseline``) on the same images users labelled
    with their verdicts, at most EVALUATION_MAX_IMAGES, in the background; 409 when a version is
    not served or there are no verdicts (admin)."""
    return await service.evaluate(
        session=session,
        actor=registry_service.Actor(admin.id, admin.email),
        name=name,
        candidate=body.candidate,
        baseline=body.baseline,
        availability=await workers.availability(fresh=True),
        max_images=settings.evaluation_max_images,
    )


@router.post(
    "/models/{name}/evaluations/{evaluation_id}/cancel",
    response_model=EvaluationPublic,
    responses={**ADMIN, **NOT_FOUND, **CONFLICT, **BODY_TOO_LARGE, **INVALID},
)
async def cancel_evaluation(
    name: ModelName, evaluation_id: uuid.UUID, _: AdminUser, session: SessionDep
) -> EvaluationPublic:
    """End a running evaluation now: its unanswered images count as cancelled; 409 when it ended (admin)."""
    return await service.cancel_evaluation(session=session, name=name, evaluation_id=evaluation_id)


@router.get(
    "/models/{name}/evaluations", response_model=list[EvaluationPublic], responses={**ADMIN, **NOT_FOUND, **INVALID}
)
async def list_evaluations(name: ModelName, _: AdminUser, session: ReadSessionDep) -> list[EvaluationPublic]:
    """The model's 20 most recent evaluations with their results, newest first (admin)."""
    return await service.evaluations_of(session=session, name=name)


@router.get(
    "/models/{name}/evaluations/{evaluation_id}",
    response_model=EvaluationPublic,
    responses={**ADMIN, **NOT_FOUND, **INVALID},
)
async def get_evaluation(
    name: ModelName, evaluation_id: uuid.UUID, _: AdminUser, session: ReadSessionDep
) -> EvaluationPublic:
    """One evaluation: per version, images answered, failed, pending, correct and accuracy (admin)."""
    return await service.evaluation(session=session, name=name, evaluation_id=evaluation_id)


@router.post(
    "/models/{name}/versions/{version}/promote",
    response_model=ModelVersionsPublic,
    responses={**ADMIN, **NOT_FOUND, **CONFLICT, **BODY},
)
async def promote_version(
    name: ModelName,
    version: Version,
    body: Promotion,
    admin: AdminUser,
    session: SessionDep,
    redis: RedisDep,
    workers: WorkersDep,
    settings: SettingsDep,
    live: LiveRegistryDep,
) -> ModelVersionsPublic:
    """Make a version stable unless it compares worse (force: with a reason); the previous one stays for rollback (admin)."""
    changed = await service.promote(
        session=session,
        actor=registry_service.Actor(admin.id, admin.email),
        name=name,
        version=version,
        reason=body.reason,
        force=body.force,
        availability=await workers.availability(fresh=True),
        margin=settings.promotion_margin,
    )
    await live.reload(session, redis)
    return ModelVersionsPublic(
        name=name,
        revision=changed.revision,
        versions=[ModelVersionPublic.model_validate(r) for r in changed.versions],
    )
