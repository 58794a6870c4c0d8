from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, File, Form, HTTPException, Query, Response, UploadFile

from api.app.catalog.service import requested_refs
from api.app.core.fields import Text
from api.app.core.responses import (
    AUTHED,
    BODY,
    INVALID,
    NOT_FOUND,
    TIMEOUT,
    TOO_LARGE,
    TOO_MANY,
    UNAVAILABLE,
    UNSUPPORTED,
    UPLOAD,
)
from api.app.deps import (
    BlockingRedisDep,
    CurrentUser,
    EngineDep,
    KeysetPageDep,
    OneFilePart,
    OwnedImage,
    ReadSessionDep,
    RedisDep,
    RegistryDep,
    RequestIdDep,
    SessionDep,
    SettingsDep,
    StoreDep,
    WorkersDep,
)
from api.app.predictions import service
from api.app.predictions.schemas import (
    ClassicPrediction,
    ImageDetail,
    JobAccepted,
    JobPublic,
    JobsPublic,
    PredictRequest,
)

router = APIRouter(prefix="/v1/predictions", tags=["predictions"])
classic = APIRouter(prefix="/model", tags=["predictions (classic)"])
# An image seen with its predictions lives here, above both domains, so that images never
# depend on predictions.
images = APIRouter(prefix="/v1/images", tags=["images"])

JOB_RESPONSES = {**BODY, **AUTHED, **NOT_FOUND, **TOO_MANY, **UNAVAILABLE}


@router.post("", response_model=JobAccepted, status_code=202, responses=JOB_RESPONSES)
async def create_prediction(
    body: PredictRequest,
    user: CurrentUser,
    engine: EngineDep,
    session: SessionDep,
    redis: RedisDep,
    store: StoreDep,
    workers: WorkersDep,
    registry: RegistryDep,
    settings: SettingsDep,
    request_id: RequestIdDep,
) -> JobAccepted:
    """Queue a prediction of one of my images by one or more model versions."""
    job = await service.submit(
        engine=engine,
        session=session,
        redis=redis,
        store=store,
        workers=workers,
        registry=registry,
        settings=settings,
        owner_id=user.id,
        image_id=body.image_id,
        refs=body.models,
        request_id=request_id,
        ground_truth=body.ground_truth,
    )
    return JobAccepted(job_id=job.id, status=job.status)


@router.get("", response_model=JobsPublic, responses={**AUTHED, **INVALID})
async def list_predictions(
    user: CurrentUser,
    session: ReadSessionDep,
    redis: RedisDep,
    page: KeysetPageDep,
    image_id: Annotated[list[uuid.UUID] | None, Query(max_length=200, description="Only these images' jobs")] = None,
) -> JobsPublic:
    """My prediction jobs, newest first; follow ``next_cursor`` for older ones (``total=true`` counts them)."""
    return await service.list_jobs(session=session, redis=redis, owner_id=user.id, page=page, image_ids=image_id)


@router.get("/{job_id}", response_model=JobPublic, responses={**AUTHED, **NOT_FOUND, **INVALID})
async def read_prediction(job_id: uuid.UUID, user: CurrentUser, session: ReadSessionDep, redis: RedisDep) -> JobPublic:
    """A prediction job with each model's answer and timings."""
    job = await service.get_owned_job(session=session, owner_id=user.id, job_id=job_id)
    if job is None:
        raise HTTPException(status_code=404, detail="Prediction not found")
    return JobPublic.from_row(job, await service.running_ids(redis, job.predictions))


@classic.post(
    "/predict",
    response_model=ClassicPrediction,
    responses={**UPLOAD, **NOT_FOUND, **TOO_MANY, **UNAVAILABLE, **TIMEOUT},
    dependencies=[OneFilePart],
)
async def predict(
    user: CurrentUser,
    engine: EngineDep,
    session: SessionDep,
    reader: ReadSessionDep,
    redis: RedisDep,
    blocking_redis: BlockingRedisDep,
    store: StoreDep,
    workers: WorkersDep,
    registry: RegistryDep,
    settings: SettingsDep,
    request_id: RequestIdDep,
    file: Annotated[UploadFile, File(description="The image to classify")],
    models: Annotated[list[str] | None, Query(description='e.g. "mobilenet_v2" or "sketch@2"')] = None,
    models_in_form: Annotated[
        list[str] | None, Form(alias="models", description="The same as a form field (not both)")
    ] = None,
    ground_truth: Annotated[
        Text | None, Query(min_length=1, max_length=200, description="Your own label: one of the models' labels")
    ] = None,
    ground_truth_in_form: Annotated[
        Text | None,
        Form(alias="ground_truth", min_length=1, max_length=200, description="The same as a form field (not both)"),
    ] = None,
) -> ClassicPrediction:
    """Upload an image and wait for its prediction (one call) by the ``models`` (in the query or
    the form, not both; none: the default), with your own label ``ground_truth`` if you like (in
    the query or the form, not both: 422)."""
    if ground_truth is not None and ground_truth_in_form is not None:
        raise HTTPException(status_code=422, detail="Give ground_truth in the form or in the query, not both.")
    return await service.predict_and_wait(
        engine=engine,
        session=session,
        reader=reader,
        redis=redis,
        blocking_redis=blocking_redis,
        store=store,
        workers=workers,
        registry=registry,
        settings=settings,
        owner_id=user.id,
        file=file,
        refs=requested_refs(form=models_in_form, query=models),
        request_id=request_id,
        ground_truth=ground_truth if ground_truth is not None else ground_truth_in_form,
    )


@images.get("/{image_id}", response_model=ImageDetail, responses={**AUTHED, **NOT_FOUND, **INVALID})
async def read_image(image: OwnedImage, session: SessionDep) -> ImageDetail:
    """One of my uploads with its newest predictions (``GET /v1/predictions?image_id=`` pages the rest)."""
    newest = await service.jobs_of_image(session=session, image_id=image.id)
    detail = ImageDetail.model_validate(image)
    detail.jobs, detail.jobs_count, detail.jobs_next_cursor = newest
    return detail


@images.get(
    "/{image_id}/view",
    # An image stored before uploads were checked as strictly as now may no longer decode (413, 415, 422).
    responses={
        **AUTHED,
        **NOT_FOUND,
        **TOO_LARGE,
        **UNSUPPORTED,
        **INVALID,
        200: {"content": {"image/png": {}}, "description": "PNG with predictions"},
    },
    response_class=Response,
)
async def image_view(image: OwnedImage, session: SessionDep, store: StoreDep, settings: SettingsDep) -> Response:
    """The image as PNG with its latest predictions written under it."""
    png = await service.render_image_view(session=session, store=store, settings=settings, image=image)
    return Response(content=png, media_type="image/png")
