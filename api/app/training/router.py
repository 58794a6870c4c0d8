from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, status

from api.app.core.responses import ADMIN, BODY, BODY_TOO_LARGE, CONFLICT, INVALID, NOT_FOUND
from api.app.deps import AdminUser, PageDep, ReadSessionDep, RedisDep, SessionDep, SettingsDep, StoreDep, WorkersDep
from api.app.registry import service as registry_service
from api.app.registry.router import ModelName, Version
from api.app.training import service
from api.app.training.schemas import TrainingRecordPublic, TrainingRequest, TrainingRunPublic, TrainingRunsPublic

router = APIRouter(prefix="/v1/admin", tags=["training"])


@router.post(
    "/training-runs",
    response_model=TrainingRunPublic,
    status_code=status.HTTP_202_ACCEPTED,
    responses={**ADMIN, **NOT_FOUND, **CONFLICT, **BODY},
)
async def start_training_run(
    body: TrainingRequest,
    admin: AdminUser,
    session: SessionDep,
    redis: RedisDep,
    store: StoreDep,
    settings: SettingsDep,
    workers: WorkersDep,
) -> TrainingRunPublic:
    """Train the model's next version from a base version (default: stable) on QuickDraw plus users'
    labelled train examples, in the training worker; it is registered in shadow when it ends (admin).
    409 when the base version is not served and the workers say why."""
    run = await service.create_run(
        session=session,
        redis=redis,
        store=store,
        data_dir=settings.training_data_dir,
        actor=registry_service.Actor(admin.id, admin.email),
        name=body.model,
        base_version=body.base_version,
        options=body.options,
        reason=body.reason,
        availability=await workers.availability(),
    )
    return TrainingRunPublic.from_row(run)


@router.get("/training-runs", response_model=TrainingRunsPublic, responses={**ADMIN, **INVALID})
async def list_training_runs(
    _: AdminUser,
    session: ReadSessionDep,
    page: PageDep,
    model: Annotated[str | None, Query(pattern=r"^[a-z0-9_]+$", max_length=64)] = None,
) -> TrainingRunsPublic:
    """A page of the training runs (of one model), newest first, with their progress, and how
    many there are: ``skip`` runs, then at most ``limit`` (1 to 200, default 50) (admin)."""
    rows = await service.list_runs(session=session, model=model, skip=page.skip, limit=page.limit)
    return TrainingRunsPublic(
        data=[TrainingRunPublic.from_row(r) for r in rows], count=await service.count_runs(session=session, model=model)
    )


@router.get("/training-runs/{run_id}", response_model=TrainingRunPublic, responses={**ADMIN, **NOT_FOUND, **INVALID})
async def read_training_run(run_id: uuid.UUID, _: AdminUser, session: ReadSessionDep) -> TrainingRunPublic:
    """One run: status, epoch n of N with loss and accuracy so far, ETA; its training record when done (admin)."""
    return TrainingRunPublic.from_row(await service.get_run(session=session, run_id=run_id))


@router.post(
    "/training-runs/{run_id}/cancel",
    response_model=TrainingRunPublic,
    responses={**ADMIN, **NOT_FOUND, **CONFLICT, **BODY_TOO_LARGE, **INVALID},
)
async def cancel_training_run(
    run_id: uuid.UUID, _: AdminUser, session: SessionDep, redis: RedisDep
) -> TrainingRunPublic:
    """Cancel a run: a queued one at once, a running one within seconds, part-way through its epoch; 409 when it ended (admin)."""
    return TrainingRunPublic.from_row(await service.cancel_run(session=session, redis=redis, run_id=run_id))


@router.get(
    "/registry/models/{name}/versions/{version}/training",
    response_model=TrainingRecordPublic,
    responses={**ADMIN, **NOT_FOUND, **INVALID},
)
async def read_training_record(
    name: ModelName, version: Version, _: AdminUser, session: ReadSessionDep, redis: RedisDep
) -> TrainingRecordPublic:
    """How a version was trained: options, data, loss and accuracy per epoch, per-class scores,
    confusion matrix; from its training run, or from the metrics.json of a version trained before
    runs existed. 404 for an unknown version or one not trained by the portal (admin)."""
    run, record = await service.training_record(session=session, redis=redis, name=name, version=version)
    return TrainingRecordPublic(
        model_name=name,
        version=version,
        source="run" if run is not None else "metrics.json",
        run=TrainingRunPublic.from_row(run) if run is not None else None,
        record=record,
    )
