"""Explanations of predictions: Grad-CAM heatmaps asked of an explainer process over Redis.

The API never computes a heatmap: it finds the prediction (the owner's only), the Keras twin that
explains its version (``Registry.keras_twin``), returns the user's cached heatmap of (image
sha256, version) when there is one, and otherwise queues a request on ``explain:<twin>`` and waits,
at most EXPLANATION_WAIT_SECONDS, on the list the explainer answers on. Predictions never go
through any of this.

Only one request per (user, image, version) is queued at a time (``explanation_inflight_key``):
the same user's others wait for its cached answer. Admission is one Lua script, so concurrent
requests cannot all pass a check made before any of them is added: it trims the stream's entries
past their deadline (a dead explainer's: they would otherwise count for ever), refuses with 429
beyond EXPLANATIONS_IN_FLIGHT_PER_USER of the user's requests and with 503 beyond
EXPLANATION_QUEUE_LIMIT entries, and queues the request.
"""

from __future__ import annotations

import asyncio
import functools
import io
import time
import uuid
from dataclasses import dataclass, field
from typing import cast

import numpy as np
from fastapi import HTTPException
from PIL import Image as PILImage
from redis.asyncio import Redis
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from api.app.core.config import Settings
from api.app.images.models import Image
from api.app.images.service import VIEW_SIZE, drawn_in_slot
from api.app.images.storage import LocalBlobStore
from api.app.predictions.models import Job, Prediction
from contracts import keys, workers
from contracts.imaging import ImageRejected, load_image
from contracts.messages import ExplainRequest, Explanation, ExplanationStatus, PredictionStatus
from contracts.registry import Registry
from contracts.streams import STREAM_MAXLEN

POLL_S = 0.1
"""How often a request waiting on another's computation of the same explanation looks for it."""
LIVENESS_CHECK_S = 2.0
"""How often a request waiting for its explainer's answer checks that a live explainer still holds
the twin: one killed meanwhile leaves it 503 once its heartbeat expires, not the whole wait."""

_ADMIT = """
redis.call('XTRIM', KEYS[1], 'MINID', ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[2])
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[3]) then return -1 end
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[4]) then return -2 end
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[6])
redis.call('PEXPIRE', KEYS[2], ARGV[7])
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[8], '*', 'meta', ARGV[9], 'image', ARGV[10])
return 0
"""
"""KEYS: the twin's stream, the user's set of requests. ARGV: the oldest stream id still awaited,
now (ms), the per-user cap, the queue limit, the deadline (ms), the request id, the user set's TTL
(ms), the stream's MAXLEN, the request's fields. 0 queued, -1 the user is at the cap, -2 full."""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
"""Deletes the in-flight marker only if this request still holds it (it may have expired)."""


@dataclass(frozen=True)
class Explained:
    prediction: Prediction
    explanation: Explanation
    cached: bool


def _unavailable(detail: str, settings: Settings) -> HTTPException:
    return HTTPException(status_code=503, detail=detail, headers={"Retry-After": str(settings.retry_after_seconds)})


@dataclass(frozen=True)
class LiveExplainers:
    held: set[str]
    """``name@version`` of every Keras twin a live explainer holds."""
    not_explainable: dict[str, str]
    """Twins a live explainer found nothing to explain with in, with why."""
    loading: set[str] = field(default_factory=set)
    """Twins a live explainer is building now."""
    revisions: list[int] = field(default_factory=list)
    """The registry revision each live explainer follows (those that say)."""

    def coming(self, twin: str, revision: int) -> bool:
        """Whether ``twin`` may be held in a moment: an explainer is building it, or one has not
        yet followed the registry to ``revision`` (the API's), in which it may be served."""
        return twin in self.loading or any(r < revision for r in self.revisions)


async def live_explainers(redis: Redis) -> LiveExplainers:
    """What the live explainers hold, and what they cannot explain: read from their index
    (``workers.LIVE_EXPLAINERS``, two round trips), never by a scan of the keyspace, which holds
    every cached answer. An explainer whose heartbeat expired is not among them."""
    found = LiveExplainers(set(), {})
    for beat in await workers.live_explainer_heartbeats_async(redis):
        found.held.update(beat.models)
        found.not_explainable.update(beat.not_explainable)
        found.loading.update(beat.loading)
        if beat.revision is not None:
            found.revisions.append(beat.revision)
    return found


def _explained(registry: Registry, key: str, settings: Settings) -> bool:
    """Whether the registry serves ``key`` (``name@version``), whose twin explainers then hold: a
    retired or disabled version is not explained any more, even while its twin serves another
    version (an INT8 version's FP32 twin)."""
    return any(entry.key == key for entry in registry.served(benchmark_mode=settings.benchmark_mode))


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
    revision: int = 0,
) -> Explained:
    """The Grad-CAM heatmap of the prediction's top-1 class, cached or computed now. ``revision``:
    the registry revision ``registry`` is of; while an explainer is building the twin, or follows
    an older revision, the request waits for it (within EXPLANATION_WAIT_SECONDS) before any 503.

    Raises 404 (no such prediction, or not the user's), 409 (it has no answer: not finished or
    failed), 422 (its version cannot be explained: no Keras twin, as TFLite versions, or a twin
    retired or disabled since, which explainers let go), 502 (the explainer failed), 503 with
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
    if not PredictionStatus(prediction.status).terminal:
        # Queued in PostgreSQL also while a worker computes it (running is a flag in Redis).
        raise HTTPException(
            status_code=409, detail="The prediction is not answered yet: there is no answer to explain until it is."
        )
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
    if not _explained(registry, key, settings):
        # Before the cache: a heatmap cached before the version was retired or disabled is not
        # answered either. Nor is one an explainer still computes for the few seconds it takes to
        # read the registry's change: the registry, not the explainer's heartbeat, says what is served.
        raise HTTPException(
            status_code=422,
            detail=f"{key} is not explainable any more: it is retired or disabled.",
        )
    cache_key = keys.explanation_key(owner_id, sha256, prediction.model_name, prediction.model_version)
    if (cached := await _cached(redis, cache_key, prediction.label)) is not None:
        return Explained(prediction, cached, True)
    deadline = time.time() + settings.explanation_wait_seconds
    explainers = await live_explainers(redis)
    # An explainer building the twin (it was just registered or enabled), or still to follow the
    # registry's latest change, holds it in a few seconds: the request waits for that.
    while twin.key not in explainers.held and explainers.coming(twin.key, revision) and time.time() < deadline:
        await asyncio.sleep(POLL_S)
        explainers = await live_explainers(redis)
    if twin.key not in explainers.held:
        if (why := explainers.not_explainable.get(twin.key)) is not None:
            raise HTTPException(status_code=422, detail=f"{key} is not explainable: {why}.")
        raise _unavailable(f"No explainer holding {twin.key} is running; retry shortly.", settings)
    inflight = keys.explanation_inflight_key(owner_id, sha256, prediction.model_name, prediction.model_version)
    request_id = uuid.uuid4().hex
    while True:
        if await redis.set(inflight, request_id, nx=True, px=int(settings.explanation_wait_seconds * 1000)):
            try:
                answer = await _ask(
                    redis=redis,
                    blocking_redis=blocking_redis,
                    store=store,
                    settings=settings,
                    stream=keys.explain_stream(twin.name, twin.version),
                    request=ExplainRequest(
                        request_id=request_id,
                        model=prediction.model_name,
                        version=prediction.model_version,
                        twin=twin.key,
                        sha256=sha256,
                        label=prediction.label,
                        deadline=deadline,
                        owner_id=owner_id,
                    ),
                )
            finally:
                await redis.eval(_RELEASE, 1, inflight, request_id)
            refuse_failed(answer, key=key)
            return Explained(prediction, answer, answer.from_cache)
        # The same user asked for the same explanation moments ago: its answer will be cached.
        if time.time() + POLL_S >= deadline:
            raise _timeout(settings)
        await asyncio.sleep(POLL_S)
        if (cached := await _cached(redis, cache_key, prediction.label)) is not None:
            return Explained(prediction, cached, True)


def refuse_failed(answer: Explanation, *, key: str) -> None:
    """Raises what an explainer's answer other than ``ok`` means for the request: 422 for a
    version it cannot explain or an image it cannot read (the error says why), 502 for a failure
    of the explainer itself (logged there; its details are not the user's to read)."""
    if answer.status == ExplanationStatus.not_explainable:
        raise HTTPException(status_code=422, detail=f"{key} is not explainable: {answer.error}")
    if answer.status == ExplanationStatus.failed:
        raise HTTPException(status_code=422, detail=f"The image could not be explained: {answer.error}")
    if answer.status != ExplanationStatus.ok:
        raise HTTPException(
            status_code=502,
            detail=f"The explainer of {key} failed on this image; the failure is logged. Try again later.",
        )


async def _cached(redis: Redis, cache_key: str, label: str) -> Explanation | None:
    if (raw := await redis.get(cache_key)) is not None:
        cached = Explanation.model_validate_json(raw)
        if cached.label == label:
            return cached
    return None


TIMEOUT_RETRY_AFTER_S = 5
"""Retry-After of a 504: the explainer still computes and caches a request past its deadline
(``model.explainer``), so a retry a few seconds on finds it cached, or waits again."""


def _timeout(settings: Settings) -> HTTPException:
    return HTTPException(
        status_code=504,
        detail=f"No explanation within {settings.explanation_wait_seconds:g} s; retry: it is cached once computed.",
        headers={"Retry-After": str(TIMEOUT_RETRY_AFTER_S)},
    )


async def _image(store: LocalBlobStore, sha256: str, *, viewable: bool = False) -> bytes:
    """The image's bytes (``viewable``: its preview when it has one); 410 when its blob is gone
    from the store (deleted, or lost)."""
    try:
        return await (store.get_viewable(sha256) if viewable else store.get(sha256))
    except FileNotFoundError:
        raise HTTPException(
            status_code=410, detail="The image of this prediction is no longer stored: it cannot be explained."
        ) from None


async def _ask(
    *,
    redis: Redis,
    blocking_redis: Redis,
    store: LocalBlobStore,
    settings: Settings,
    stream: str,
    request: ExplainRequest,
) -> Explanation:
    """Queues the request if admitted (429: the user is at the cap; 503: the queue is full) and
    waits for the explainer's answer until the request's deadline (504), or until no live
    explainer holds the twin any more (503: killed or stopped meanwhile; a request it left is
    answered by the next explainer that holds the twin, and its heatmap cached)."""
    image = await _image(store, request.sha256)
    now = time.time()
    user_key = keys.explanations_of_user_key(cast(int, request.owner_id))
    admitted = await redis.eval(
        _ADMIT,
        2,
        stream,
        user_key,
        f"{int((now - settings.explanation_wait_seconds) * 1000)}-0",
        int(now * 1000),
        settings.explanations_in_flight_per_user,
        settings.explanation_queue_limit,
        int(request.deadline * 1000),
        request.request_id,
        int(settings.explanation_wait_seconds * 1000) + 1000,
        STREAM_MAXLEN,
        request.model_dump_json(),
        image,
    )
    if admitted == -1:
        raise HTTPException(
            status_code=429,
            detail=f"You have {settings.explanations_in_flight_per_user} explanations being computed; "
            "retry when one is answered.",
            headers={"Retry-After": str(settings.retry_after_seconds)},
        )
    if admitted == -2:
        raise _unavailable(f"The explanation queue of {request.twin} is full; retry shortly.", settings)
    try:
        while True:
            left = request.deadline - time.time()
            got = cast(
                list[bytes] | None,
                await blocking_redis.blpop(
                    [keys.explanation_done_key(request.request_id)], timeout=max(0.1, min(left, LIVENESS_CHECK_S))
                ),
            )
            if got is not None or left <= LIVENESS_CHECK_S:
                break
            live = await live_explainers(redis)
            if request.twin not in live.held and request.twin not in live.loading:
                raise _unavailable(
                    f"The explainer of {request.twin} stopped before it answered; retry shortly.", settings
                )
    finally:
        await redis.zrem(user_key, request.request_id)
    if got is None:
        raise _timeout(settings)
    return Explanation.model_validate_json(got[1])


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


MAX_SHOWN_ASPECT = 4
"""The longest side of an overlay is at most this many times its shortest, as the UI shows
pictures (``ui.results.MAX_SHOWN_ASPECT``): a sliver (4000x2 pixels) is drawn on a plain band
rather than as an 800x1 strip nobody can read."""

BAND_COLOUR = (240, 240, 240)


def _banded(img: PILImage.Image) -> tuple[PILImage.Image, tuple[int, int, int, int]]:
    """``img`` centred on a plain band of at most MAX_SHOWN_ASPECT to 1 (itself when it is no
    longer than that), and how many pixels of band lie (left, top, right, bottom) of it."""
    width, height = img.size
    if max(width, height) <= MAX_SHOWN_ASPECT * min(width, height):
        return img, (0, 0, 0, 0)
    short_side = -(-max(width, height) // MAX_SHOWN_ASPECT)
    size = (width, short_side) if width >= height else (short_side, height)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    band = PILImage.new("RGB", size, BAND_COLOUR)
    band.paste(img, (left, top))
    return band, (left, top, size[0] - width - left, size[1] - height - top)


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
    img, (left, top, right, bottom) = _banded(img)
    # The model saw a sliver stretched to a square, so its heat says where along the sliver the
    # evidence lies: each column (or row) of heat goes on across the band, readable at a glance.
    heat = np.pad(heat, ((top, bottom), (left, right)), mode="edge")
    heat = np.clip(heat, 0.0, 1.0)[..., None]
    base = np.asarray(img, dtype=np.float32)
    # Opacity follows the heat: cold regions show the picture as it is.
    alpha = 0.15 + 0.45 * heat
    out = base * (1 - alpha) + _colour(heat[..., 0]) * alpha
    buf = io.BytesIO()
    PILImage.fromarray(out.clip(0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


async def overlay_png(*, store: LocalBlobStore, settings: Settings, sha256: str, heatmap: list[list[float]]) -> bytes:
    """The image (at most VIEW_SIZE a side; one longer than MAX_SHOWN_ASPECT times its width or
    height centred on a plain band of that ratio) with the heatmap blended over it, as PNG; 422 when the
    stored image no longer decodes, 410 when it is gone from the store. Drawn from the upload's
    stored preview when it has one (a 49-megapixel PNG is not decoded again at full size for each
    overlay), in one of the MAX_CONCURRENT_DECODES decode slots uploads take."""
    data = await _image(store, sha256, viewable=True)
    try:
        return await drawn_in_slot(
            functools.partial(_overlay, heatmap=heatmap), data, max_decodes=settings.max_concurrent_decodes
        )
    except ImageRejected as exc:
        raise HTTPException(status_code=exc.status, detail=exc.message) from None
