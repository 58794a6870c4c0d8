from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, File, HTTPException, Query, Request, UploadFile

from api.app.core.responses import (
    AUTHED,
    INVALID,
    NOT_FOUND,
    TIMEOUT,
    TOO_LARGE,
    TOO_MANY,
    UNAVAILABLE,
    UNSUPPORTED,
)
from api.app.deps import CurrentUser, ReadSessionDep, RedisDep, RegistryDep, SessionDep, SettingsDep
from api.app.images import service as images_service
from api.app.predictions import queue, service
from api.app.predictions.schemas import (
    ClassicPrediction,
    JobAccepted,
    JobPublic,
    JobsPublic,
    PredictionPublic,
    PredictRequest,
)

router = APIRouter(prefix="/v1/predictions", tags=["predictions"])
classic = APIRouter(prefix="/model", tags=["predictions (classic)"])

JOB_RESPONSES = {**AUTHED, **NOT_FOUND, **INVALID, **TOO_MANY, **UNAVAILABLE}


def request_id(request: Request) -> str:
    return getattr(request.state, "request_id", "") or uuid.uuid4().hex


@router.post("", response_model=JobAccepted, status_code=202, responses=JOB_RESPONSES)
async def create_prediction(
    body: PredictRequest,
    request: Request,
    user: CurrentUser,
    session: SessionDep,
    redis: RedisDep,
    registry: RegistryDep,
    settings: SettingsDep,
) -> JobAccepted:
    """Queue a prediction of one of my images by one or more model versions."""
    image = await images_service.get_owned_image(session=session, owner_id=user.id, image_id=body.image_id)
    if image is None:
        raise HTTPException(status_code=404, detail="Image not found")
    entries = service.resolve_models(
        body.models,
        registry=registry,
        availability=await request.app.state.workers.availability(),
        settings=settings,
    )
    cached = await service.admit(
        session=session, redis=redis, settings=settings, entries=entries, owner_id=user.id, sha256=image.sha256
    )
    job = await service.create_job(
        session=session,
        redis=redis,
        store=request.app.state.store,
        image=image,
        entries=entries,
        cached=cached,
        owner_id=user.id,
        deadline_seconds=settings.job_deadline_seconds,
        request_id=request_id(request),
    )
    return JobAccepted(job_id=job.id, status=job.status)


@router.get("", response_model=JobsPublic, responses=AUTHED)
async def list_predictions(
    user: CurrentUser,
    session: ReadSessionDep,
    redis: RedisDep,
    skip: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    image_id: Annotated[list[uuid.UUID] | None, Query(max_length=200, description="Only these images' jobs")] = None,
) -> JobsPublic:
    """My prediction jobs, newest first."""
    jobs, count = await service.list_jobs(session=session, owner_id=user.id, skip=skip, limit=limit, image_ids=image_id)
    running = await service.running_ids(redis, [p for j in jobs for p in j.predictions])
    return JobsPublic(data=[service.job_public(j, running) for j in jobs], count=count)


@router.get("/{job_id}", response_model=JobPublic, responses={**AUTHED, **NOT_FOUND})
async def read_prediction(job_id: uuid.UUID, user: CurrentUser, session: ReadSessionDep, redis: RedisDep) -> JobPublic:
    """A prediction job with each model's answer and timings."""
    job = await service.get_owned_job(session=session, owner_id=user.id, job_id=job_id)
    if job is None:
        raise HTTPException(status_code=404, detail="Prediction not found")
    return service.job_public(job, await service.running_ids(redis, job.predictions))


@classic.post(
    "/predict",
    response_model=ClassicPrediction,
    responses={**AUTHED, **INVALID, **TOO_LARGE, **UNSUPPORTED, **TOO_MANY, **UNAVAILABLE, **TIMEOUT},
)
async def predict(
    request: Request,
    user: CurrentUser,
    session: SessionDep,
    reader: ReadSessionDep,
    redis: RedisDep,
    registry: RegistryDep,
    settings: SettingsDep,
    file: Annotated[UploadFile, File(description="The image to classify")],
    models: Annotated[list[str] | None, Query(description='e.g. "mobilenet_v2" or "sketch@2"')] = None,
) -> ClassicPrediction:
    """Upload an image and wait for its prediction (one call)."""
    refs = [r for ref in models or [] for r in ref.split(",") if r.strip()]
    entries = service.resolve_models(
        refs, registry=registry, availability=await request.app.state.workers.availability(), settings=settings
    )
    data = await images_service.read_upload(file, settings)
    info, sha256 = await images_service.inspect_upload(data, settings)
    cached = await service.admit(
        session=session, redis=redis, settings=settings, entries=entries, owner_id=user.id, sha256=sha256
    )
    # The image and its job are committed together: a rejected request stores nothing.
    image = await images_service.add_image(
        session=session,
        store=request.app.state.store,
        owner_id=user.id,
        data=data,
        info=info,
        sha256=sha256,
        filename=file.filename or "",
    )
    file_name = image.file_name
    job = await service.create_job(
        session=session,
        redis=redis,
        store=request.app.state.store,
        image=image,
        entries=entries,
        cached=cached,
        owner_id=user.id,
        deadline_seconds=settings.predict_deadline_seconds,
        request_id=request_id(request),
        data=data,
    )
    answers: list[PredictionPublic] | None = None
    if job.status in service.UNFINISHED:
        # Hand the database connection back while waiting: waiters must not exhaust the pool.
        await session.close()
        done = await queue.wait_done(request.app.state.redis_blocking, str(job.id), settings.predict_deadline_seconds)
        if done is None:
            raise HTTPException(
                status_code=504,
                detail=f"No result within {settings.predict_deadline_seconds:g} s; "
                f"the job continues as GET /v1/predictions/{job.id}.",
            )
        answers = service.answers_from_payload(done)
    if answers is None:
        answers = [service.prediction_public(p) for p in await service.job_predictions(session=reader, job_id=job.id)]
    first = answers[0]
    return ClassicPrediction(
        success=first.status == "done",
        prediction=first.label,
        score=round(first.score, 4) if first.score is not None else None,
        image_file_name=file_name,
        model=first.model,
        version=first.version,
        job_id=job.id,
        results={f"{p.model}@{p.version}": p for p in answers},
    )
