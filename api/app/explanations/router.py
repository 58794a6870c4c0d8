from __future__ import annotations

import uuid
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Response

from api.app.core.responses import AUTHED, CONFLICT, INVALID, NOT_FOUND, RETRY_AFTER, TIMEOUT, UNAVAILABLE, error
from api.app.deps import (
    BlockingRedisDep,
    CurrentUser,
    LiveRegistryDep,
    ReadSessionDep,
    RedisDep,
    RegistryDep,
    SettingsDep,
    StoreDep,
)
from api.app.explanations import service
from api.app.explanations.schemas import ExplanationPublic

router = APIRouter(prefix="/v1/predictions", tags=["explanations"])


@router.get(
    "/{prediction_id}/explanation",
    response_model=ExplanationPublic,
    responses={
        **AUTHED,
        **NOT_FOUND,
        409: {**CONFLICT[409], "description": "The prediction has no answer to explain (not finished, or failed)"},
        410: error("The prediction's image is no longer stored"),
        502: error("The explainer failed on this image (logged by the explainer)"),
        429: error(
            "Too many of my explanations being computed (EXPLANATIONS_IN_FLIGHT_PER_USER), or too many failed "
            "API keys from this address; see Retry-After",
            headers=RETRY_AFTER,
        ),
        **INVALID,
        **UNAVAILABLE,
        **TIMEOUT,
        200: {
            "content": {"image/png": {}},
            "description": "JSON heatmap, or with format=png the image with it overlaid",
        },
    },
)
async def read_explanation(
    prediction_id: uuid.UUID,
    user: CurrentUser,
    session: ReadSessionDep,
    redis: RedisDep,
    blocking_redis: BlockingRedisDep,
    store: StoreDep,
    registry: RegistryDep,
    live: LiveRegistryDep,
    settings: SettingsDep,
    format: Annotated[
        Literal["json", "png"], Query(description="json: the heatmap; png: overlaid on the image")
    ] = "json",
    size: Annotated[int, Query(ge=1, le=56, description="Cells a side of the JSON heatmap")] = 14,
) -> ExplanationPublic | Response:
    """Which regions of my image drove one prediction's top-1 class: a Grad-CAM heatmap
    (Selvaraju et al. 2017, arXiv:1610.02391), computed on demand by an explainer process and
    cached per (user, image, model version).

    ``prediction_id`` is a prediction's ``id`` (one model's answer within a job). Errors: 404 not
    yours, 409 no answer yet, 410 the image is no longer stored, 422 not explainable (no Keras twin,
    as the TFLite bird model, or retired or disabled since), 429 with Retry-After when EXPLANATIONS_IN_FLIGHT_PER_USER of mine
    are being computed, 502 when the explainer failed on it, 503 with Retry-After when no explainer is live or its queue is full, 504
    when none answered within EXPLANATION_WAIT_SECONDS.
    """
    explained = await service.explain(
        session=session,
        redis=redis,
        blocking_redis=blocking_redis,
        store=store,
        registry=registry,
        settings=settings,
        owner_id=user.id,
        prediction_id=prediction_id,
        revision=live.revision,
    )
    e = explained.explanation
    if format == "png":
        png = await service.overlay_png(store=store, settings=settings, sha256=e.sha256, heatmap=e.heatmap)
        return Response(content=png, media_type="image/png")
    return ExplanationPublic(
        prediction_id=prediction_id,
        model=e.model,
        version=e.version,
        explained_with=e.twin,
        label=e.label,
        method=e.method,
        layer=e.layer,
        size=size,
        heatmap=service.downsample(e.heatmap, size),
        cached=explained.cached,
    )
