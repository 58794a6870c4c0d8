from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query

from api.app.catalog.schemas import ModelLabels
from api.app.core.fields import Skip
from api.app.core.paging import KeysetPage
from api.app.core.responses import AUTHED, BODY, FORBIDDEN, INVALID, NOT_FOUND, UNAVAILABLE, error
from api.app.deps import (
    CurrentUser,
    FeedbackPageDep,
    ReadSessionDep,
    RedisDep,
    RegistryDep,
    SessionDep,
    SettingsDep,
)
from api.app.feedback import service
from api.app.feedback.models import Feedback
from api.app.feedback.schemas import ClassicFeedbackCreate, FeedbackCreate, FeedbackPublic, FeedbacksPublic

router = APIRouter(prefix="/v1/feedback", tags=["feedback"])
classic = APIRouter(prefix="/feedback", tags=["feedback (classic)"])
labels_router = APIRouter(prefix="/v1/models", tags=["models"])
"""What a verdict may name: a version's labels, listed with the models but owned here, as only
the predictions show which shadow versions answered whom."""

Limit = Annotated[int, Query(ge=1, le=500)]


def _public(row: Feedback) -> FeedbackPublic:
    """A stored verdict with the model version it judged (``name@version``)."""
    judged = f"{row.model_name}@{row.model_version}" if row.model_name else None
    return FeedbackPublic.model_validate(row).model_copy(update={"model": judged})


def _scope(user: CurrentUser, all_users: bool) -> int | None:
    if all_users and not user.is_admin:
        raise HTTPException(status_code=403, detail="Only admins can list everyone's feedback")
    return None if all_users else user.id


@router.post(
    "", response_model=FeedbackPublic, status_code=201, responses={**BODY, **AUTHED, **NOT_FOUND, **UNAVAILABLE}
)
async def create_feedback(
    body: FeedbackCreate,
    user: CurrentUser,
    session: SessionDep,
    redis: RedisDep,
    registry: RegistryDep,
    settings: SettingsDep,
) -> FeedbackPublic:
    """Say whether one of my predictions was right, and if not, what the right label is."""
    feedback = await service.create_feedback(
        session=session,
        redis=redis,
        registry=registry,
        owner_id=user.id,
        body=body,
        test_share=settings.feedback_test_share,
    )
    return _public(feedback)


@router.get("", response_model=FeedbacksPublic, responses={**AUTHED, **FORBIDDEN, **INVALID})
async def list_feedback(
    user: CurrentUser,
    session: ReadSessionDep,
    page: FeedbackPageDep,
    all_users: bool = False,
    prediction_id: Annotated[
        list[uuid.UUID] | None, Query(max_length=500, description="Only the feedback on these predictions")
    ] = None,
) -> FeedbacksPublic:
    """My feedback (admins: everyone's with all_users=true), newest first, each with the model
    version it judged; follow ``next_cursor`` for older ones (``total=true`` counts them)."""
    rows, count, next_cursor = await service.list_feedback(
        session=session, owner_id=_scope(user, all_users), page=page, prediction_ids=prediction_id
    )
    return FeedbacksPublic(data=[_public(r) for r in rows], count=count, next_cursor=next_cursor)


@classic.post("/", response_model=FeedbackPublic, status_code=201, responses={**BODY, **AUTHED})
async def classic_create_feedback(body: ClassicFeedbackCreate, user: CurrentUser, session: SessionDep) -> Feedback:
    """Report a wrong prediction (score, predicted_class, image_file_name, feedback)."""
    return await service.create_classic_feedback(session=session, owner_id=user.id, body=body)


@classic.get("/", response_model=list[FeedbackPublic], responses={**AUTHED, **FORBIDDEN, **INVALID})
async def classic_list_feedback(
    user: CurrentUser, session: ReadSessionDep, all_users: bool = False, skip: Skip = 0, limit: Limit = 100
) -> list[Feedback]:
    """My feedback (admins: everyone's with all_users=true)."""
    rows, _count, _next = await service.list_feedback(
        session=session, owner_id=_scope(user, all_users), page=KeysetPage(limit=limit, skip=skip)
    )
    return rows


@labels_router.get(
    "/{ref}/labels",
    response_model=ModelLabels,
    responses={**AUTHED, **INVALID, 404: error("No such version, or its labels are not known")},
)
async def version_labels(
    ref: str, user: CurrentUser, redis: RedisDep, registry: RegistryDep, session: ReadSessionDep
) -> ModelLabels:
    """The labels of any version my predictions can come from (``name@version``), the retired
    and disabled ones included, which ``GET /v1/models`` no longer lists, and a shadow version
    that answered me (promoted, then rolled back): what a verdict on an old prediction may name
    as the right label. 404 for an unknown version (shadows are not made known to others) or one
    whose labels no worker has published yet; 422 for a malformed reference."""
    entry, labels = await service.verdict_labels(
        session=session, redis=redis, registry=registry, owner_id=user.id, ref=ref
    )
    return ModelLabels(ref=entry.key, display_name=entry.display_name, labels=labels)
