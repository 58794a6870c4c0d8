"""Explanations of predictions: Grad-CAM heatmaps asked of an explainer process over Redis.

The API never computes a heatmap: it finds the prediction (the owner's only), the Keras twin that
explains its version (``Registry.keras_twin``), returns the cached heatmap of (image sha256,
version) when there is one, and otherwise queues a request on ``explain:<twin>`` and waits, at
most EXPLANATION_WAIT_SECONDS, on the list the explainer answers on. Predictions never go through
any of this.
"""

from __future__ import annotations

import io
import json
import time
import uuid
from dataclasses import dataclass
from typing import cast

import numpy as np
from anyio import to_thread
from fastapi import HTTPException
from PIL import Image as PILImage
from redis.asyncio import Redis
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from api.app.core.config import Settings
from api.app.images.models import Image
from api.app.images.service import VIEW_SIZE
from api.app.images.storage import LocalBlobStore
from api.app.predictions.models import Job, Prediction
from contracts import keys
from contracts.imaging import ImageRejected, load_image
from contracts.messages import ExplainRequest, Explanation, ExplanationStatus, PredictionStatus
from contracts.registry import Registry
from contracts.streams import STREAM_MAXLEN


@dataclass(frozen=True)
class Explained:
    prediction: Prediction
    explanation: Explanation
    cached: bool


def _unavailable(detail: str, settings: Settings) -> HTTPException:
    return HTTPException(status_code=503, detail=detail, headers={"Retry-After": str(settings.retry_after_seconds)})


async def live_explainers(redis: Redis) -> set[str]:
    """``name@version`` of every Keras model a live explainer holds (their heartbeats expire)."""
    found: set[str] = set()
    names = [k async for k in redis.scan_iter(match=f"{keys.EXPLAINER_PREFIX}*", count=100)]
    if not names:
        return found
    for raw in await redis.mget(names):
        if raw is None:
            continue
        try:
            found.update(json.loads(raw)["models"])
        except (ValueError, KeyError, TypeError):
            continue
    return found


async def explain(
    *,
    session: AsyncSession,
    redis: Redis,
    blocking_redis: Redis,
    store: LocalBlobStore,
    registry: Registry,
    settings: Settings,
    owner_id: int,
    prediction_id: uuid.UUID,
) -> Explained:
    """The Grad-CAM heatmap of the prediction's top-1 class, cached or computed now.

    Raises 404 (no such prediction, or not the user's), 409 (it has no answer: not finished or
    failed), 422 (its version cannot be explained: no Keras twin, as TFLite versions), 503 with
    Retry-After (no live explainer holds the twin, or its queue is full), 504 (no answer within
    EXPLANATION_WAIT_SECONDS; the heatmap is cached once computed).
    """
    row = (
        await session.execute(
            select(Prediction, Image.sha256)
            .join(Job, Prediction.job_id == Job.id)
            .join(Image, Job.image_id == Image.id)
            .where(Prediction.id == prediction_id, Job.owner_id == owner_id)
        )
    ).first()
    if row is None:
        raise HTTPException(status_code=404, detail="Prediction not found")
    prediction, sha256 = cast(tuple[Prediction, str], tuple(row))
    await session.close()  # no connection held while waiting for an explainer
    if prediction.status != PredictionStatus.done.value or not prediction.label:
        raise HTTPException(
            status_code=409, detail=f"The prediction is {prediction.status}: there is no answer to explain."
        )
    key = f"{prediction.model_name}@{prediction.model_version}"
    twin = registry.keras_twin(key)
    if twin is None:
        raise HTTPException(
            status_code=422,
            detail=f"{key} is not explainable: Grad-CAM needs a Keras model to take gradients of, and {key} has none.",
        )
    cache_key = keys.explanation_key(sha256, prediction.model_name, prediction.model_version)
    if (raw := await redis.get(cache_key)) is not None:
        cached = Explanation.model_validate_json(raw)
        if cached.label == prediction.label:
            return Explained(prediction, cached, True)
    if twin.key not in await live_explainers(redis):
        raise _unavailable(f"No explainer holding {twin.key} is running; retry shortly.", settings)
    stream = keys.explain_stream(twin.name, twin.version)
    if await redis.xlen(stream) >= settings.explanation_queue_limit:
        raise _unavailable(f"The explanation queue of {twin.key} is full; retry shortly.", settings)
    request = ExplainRequest(
        request_id=uuid.uuid4().hex,
        model=prediction.model_name,
        version=prediction.model_version,
        twin=twin.key,
        sha256=sha256,
        label=prediction.label,
        deadline=time.time() + settings.explanation_wait_seconds,
        image=await store.get(sha256),
    )
    await redis.xadd(stream, request.to_fields(), maxlen=STREAM_MAXLEN, approximate=True)
    got = cast(
        list[bytes] | None,
        await blocking_redis.blpop(
            [keys.explanation_done_key(request.request_id)], timeout=settings.explanation_wait_seconds
        ),
    )
    if got is None:
        raise HTTPException(
            status_code=504,
            detail=f"No explanation within {settings.explanation_wait_seconds:g} s; retry: it is cached once computed.",
        )
    answer = Explanation.model_validate_json(got[1])
    if answer.status == ExplanationStatus.not_explainable:
        raise HTTPException(status_code=422, detail=f"{key} is not explainable: {answer.error}")
    if answer.status != ExplanationStatus.ok:
        raise HTTPException(status_code=422, detail=f"The image could not be explained: {answer.error}")
    return Explained(prediction, answer, False)


def downsample(heatmap: list[list[float]], size: int) -> list[list[float]]:
    """The heatmap averaged into ``size`` x ``size`` cells (area averaging keeps values in [0, 1])."""
    arr = np.asarray(heatmap, dtype=np.float32)
    small = np.asarray(PILImage.fromarray(arr, mode="F").resize((size, size), PILImage.Resampling.BOX))
    return [[round(float(v), 3) for v in row] for row in np.clip(small, 0.0, 1.0)]


def _colour(heat: np.ndarray) -> np.ndarray:
    """A heat colour ramp: transparent-blue (0) through yellow to red (1), as RGB in [0, 255]."""
    r = np.clip(heat * 2.0, 0, 1)
    g = np.clip(2.0 - np.abs(heat * 4.0 - 2.0), 0, 1) * 0.9
    b = np.clip(1.0 - heat * 2.0, 0, 1) * 0.6
    return np.stack([r, g, b], axis=-1) * 255.0


def _overlay(data: bytes, heatmap: list[list[float]]) -> bytes:
    img = load_image(data, mode="RGB", draft_size=(VIEW_SIZE, VIEW_SIZE))
    img.thumbnail((VIEW_SIZE, VIEW_SIZE))
    if max(img.size) < 224:  # a 28-pixel drawing drawn large enough to see
        factor = -(-224 // max(img.size))
        img = img.resize((img.width * factor, img.height * factor), PILImage.Resampling.NEAREST)
    heat = np.asarray(
        PILImage.fromarray(np.asarray(heatmap, dtype=np.float32), mode="F").resize(
            img.size, PILImage.Resampling.BILINEAR
        )
    )
    heat = np.clip(heat, 0.0, 1.0)[..., None]
    base = np.asarray(img, dtype=np.float32)
    # Opacity follows the heat: cold regions show the picture as it is.
    alpha = 0.15 + 0.45 * heat
    out = base * (1 - alpha) + _colour(heat[..., 0]) * alpha
    buf = io.BytesIO()
    PILImage.fromarray(out.clip(0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


async def overlay_png(*, store: LocalBlobStore, sha256: str, heatmap: list[list[float]]) -> bytes:
    """The image (at most VIEW_SIZE a side) with the heatmap blended over it, as PNG; 422 when the
    stored image no longer decodes."""
    data = await store.get(sha256)
    try:
        return await to_thread.run_sync(_overlay, data, heatmap)
    except ImageRejected as exc:
        raise HTTPException(status_code=exc.status, detail=exc.message) from None
