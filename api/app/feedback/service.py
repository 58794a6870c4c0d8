"""Feedback on predictions."""

from __future__ import annotations

import uuid

import sqlalchemy.exc
from fastapi import HTTPException
from redis.asyncio import Redis
from sqlalchemy import func, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from api.app.catalog.service import model_labels
from api.app.core import metrics
from api.app.core.errors import violated_constraint
from api.app.core.paging import KeysetPage, keyset_page
from api.app.examples import service as examples
from api.app.examples.models import LabelledExample
from api.app.feedback.models import Feedback
from api.app.feedback.schemas import ClassicFeedbackCreate, FeedbackCreate
from api.app.images.models import Image
from api.app.images.service import OWNER_GONE
from api.app.predictions.models import Job, Prediction
from contracts.messages import PredictionStatus
from contracts.registry import ModelEntry, Registry, parse_model_ref

_PREDICTION_FK = "fk_feedback_prediction_id_predictions"
_OWNER_FK = "fk_feedback_owner_id_users"


async def owned_prediction(*, session: AsyncSession, owner_id: int, prediction_id: uuid.UUID) -> Prediction | None:
    return await session.scalar(
        select(Prediction).join(Job).where(Prediction.id == prediction_id, Job.owner_id == owner_id)
    )


async def verdict_labels(
    *, session: AsyncSession, redis: Redis, registry: Registry, owner_id: int, ref: str
) -> tuple[ModelEntry, list[str]]:
    """The registry's entry of version ``ref`` (``name@version``) and the labels a
    verdict of ``owner_id``'s may name as
    the right one: of any version people's predictions come from, the retired and disabled ones
    included, and of a shadow only for someone it answered (promoted, then rolled back into
    shadow): shadows are not made known to others. Raises 422 for a malformed reference, 404 for
    an unknown version or one whose labels no worker has published yet."""
    try:
        name, version = parse_model_ref(ref)
    except ValueError as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from None
    if version is None:
        raise HTTPException(status_code=422, detail=f"{ref!r} names no version: ask for name@version (sketch@3).")
    entry = next((m for m in registry.models if m.name == name and m.version == version), None)
    answered_them = (
        entry is not None
        and entry.channel == "shadow"
        and await session.scalar(
            select(Prediction.id)
            .join(Job)
            .where(Prediction.model_name == name, Prediction.model_version == version, Job.owner_id == owner_id)
            .limit(1)
        )
        is not None
    )
    if entry is None or entry.benchmark_only or (entry.channel == "shadow" and not answered_them):
        raise HTTPException(status_code=404, detail=f"Unknown model {ref!r}")
    labels = await model_labels(redis, entry, session=session)
    if labels is None:
        served = entry.enabled and entry.channel != "retired"
        why = "no worker has published them yet" if served else "it is not served any more"
        raise HTTPException(status_code=404, detail=f"The labels of {entry.key} are not known: {why}")
    return entry, labels


async def check_label(
    *, session: AsyncSession, redis: Redis, registry: Registry, prediction: Prediction, label: str
) -> None:
    """Whether ``label`` may be named as the right answer to ``prediction``: a label of the version
    that answered, or of another version of the same model served now (stable or canary). Raises
    422 (neither knows it), 409 (the version's labels are gone with it) or 503 (not known yet)."""
    entry = next(
        (m for m in registry.models if m.name == prediction.model_name and m.version == prediction.model_version),
        None,
    )
    labels = await model_labels(redis, entry, session=session) if entry else None
    if labels is None and (entry is None or entry.channel == "retired" or not entry.enabled):
        # No worker will publish them again: waiting would not help.
        raise HTTPException(
            status_code=409,
            detail=f"The labels of {prediction.model_name}@{prediction.model_version} are no longer known (it is "
            "not served any more): say whether it was right, or wrong without naming the right label.",
        )
    if labels is None:
        raise HTTPException(
            status_code=503,
            detail=f"The labels of {prediction.model_name}@{prediction.model_version} are not known "
            "until a worker serving it has started; retry shortly.",
            headers={"Retry-After": "5"},
        )
    if label in labels:
        return
    # A version of the same model served now may know it (an older version answered, one with
    # more categories serves): the right answer is kept as the model's labelled example, which
    # the next training, from the stable version, can learn.
    for other in registry.models:
        if other.name != prediction.model_name or other.version == prediction.model_version:
            continue
        if not other.enabled or other.channel in ("retired", "shadow") or other.benchmark_only:
            continue
        if label in (await model_labels(redis, other, session=session) or []):
            return
    raise HTTPException(
        status_code=422,
        detail=f"{label!r} is not a label of {prediction.model_name}@{prediction.model_version}, nor of a "
        f"version of {prediction.model_name} served now",
    )


async def create_feedback(
    *,
    session: AsyncSession,
    redis: Redis,
    registry: Registry,
    owner_id: int,
    body: FeedbackCreate,
    test_share: float,
) -> Feedback:
    """Stores a verdict on one of the user's predictions (replacing the user's earlier verdict on
    it: one per person and prediction); one with a label (correct, or wrong with
    the right label) also becomes a labelled example of the model (``examples.record``, split
    with ``test_share``). Raises 404 (not the user's prediction), 422 (a label the model does not
    know, or "wrong" with the predicted label itself), 409 (a label named for a version no longer
    served whose labels are not kept) and 503 (the model's labels are not known yet)."""
    prediction = await owned_prediction(session=session, owner_id=owner_id, prediction_id=body.prediction_id)
    if prediction is None:
        raise HTTPException(status_code=404, detail="Prediction not found")
    if prediction.label is None:
        raise HTTPException(
            status_code=422,
            detail=f"This prediction has no answer to judge (it is {prediction.status}).",
        )
    if body.is_correct and body.correct_label not in (None, prediction.label):
        raise HTTPException(
            status_code=422,
            detail=f"The prediction was {prediction.label!r}: confirming it takes that label or none; "
            "a wrong prediction is is_correct=false with the right label.",
        )
    if body.correct_label is not None:
        if not body.is_correct and body.correct_label == prediction.label:
            raise HTTPException(
                status_code=422,
                detail=f"The prediction was {prediction.label!r}; a wrong prediction needs a different label.",
            )
        await check_label(
            session=session, redis=redis, registry=registry, prediction=prediction, label=body.correct_label
        )
    values = {
        "owner_id": owner_id,
        "prediction_id": prediction.id,
        "is_correct": body.is_correct,
        "correct_label": (
            body.correct_label if body.correct_label is not None else (prediction.label if body.is_correct else None)
        ),
        "comment": body.comment,
        "predicted_class": prediction.label,
        "score": prediction.score,
        "model_name": prediction.model_name,
        "model_version": prediction.model_version,
        "predicted_label": prediction.label,
        # The database's clock, read once this transaction holds the export fence (see
        # ``hold_export_fence``): an export's end ``until`` is read on the same clock.
        "created_at": func.clock_timestamp(),
    }
    await hold_export_fence(session, exclusive=False)
    # One verdict per person and prediction: saying it again replaces the earlier one (counted once).
    statement = insert(Feedback).values(id=uuid.uuid4(), **values)
    statement = statement.on_conflict_do_update(
        index_elements=[Feedback.owner_id, Feedback.prediction_id],
        index_where=Feedback.prediction_id.is_not(None) & Feedback.is_correct.is_not(None),
        set_={k: statement.excluded[k] for k in ("is_correct", "correct_label", "comment", "created_at")},
    )
    try:
        feedback = await session.scalar(statement.returning(Feedback), execution_options={"populate_existing": True})
    except sqlalchemy.exc.IntegrityError as exc:
        # What the verdict is for was deleted after it was read: its prediction (with its image),
        # or the account itself.
        constraint = violated_constraint(exc)
        if constraint == _PREDICTION_FK:
            raise HTTPException(status_code=404, detail="Prediction not found: it was deleted meanwhile.") from None
        if constraint == _OWNER_FK:
            raise HTTPException(status_code=401, detail=OWNER_GONE) from None
        raise
    assert feedback is not None
    if feedback.correct_label is None:
        # A verdict said again as "wrong" without the right label takes back the label it gave.
        await examples.forget_verdict(session=session, feedback_id=feedback.id)
    else:
        image = await session.scalar(
            select(Image).join(Job, Job.image_id == Image.id).where(Job.id == prediction.job_id)
        )
        if image is not None:
            labelled = examples.example(
                model_name=prediction.model_name,
                sha256=image.sha256,
                label=feedback.correct_label,
                source="verdict",
                owner_id=owner_id,
                test_share=test_share,
                feedback_id=feedback.id,
            )
            await examples.record(session=session, example=labelled)
    await session.commit()
    verdict = "correct" if body.is_correct else "wrong"
    metrics.FEEDBACK.labels(prediction.model_name, str(prediction.model_version), verdict).inc()
    return feedback


EXPORT_FENCE = "feedback-export-fence"


async def hold_export_fence(session: AsyncSession, *, exclusive: bool) -> None:
    """Takes the export fence until the transaction ends: shared by each verdict's transaction,
    exclusive while an export reads the clock for its end. So every verdict stamped up to an
    export's end has committed before the export reads, and every later one is stamped after it:
    an incremental export (``since`` the last one's end) misses none, whatever the clocks of the
    API's hosts or how long a verdict's transaction takes to commit."""
    lock = "pg_advisory_xact_lock" if exclusive else "pg_advisory_xact_lock_shared"
    await session.execute(text(f"SELECT {lock}(hashtextextended(:fence, 0))"), {"fence": EXPORT_FENCE})


async def latest_matching_prediction(
    *, session: AsyncSession, owner_id: int, body: ClassicFeedbackCreate
) -> Prediction | None:
    """My latest finished prediction of the image ``body.image_file_name`` names (its SHA-256 and
    extension), with ``body.predicted_class`` as its label when given; None without a match."""
    if not body.image_file_name:
        return None
    sha256 = body.image_file_name.split(".", 1)[0]
    query = (
        select(Prediction)
        .join(Job, Prediction.job_id == Job.id)
        .join(Image, Job.image_id == Image.id)
        .where(Job.owner_id == owner_id, Image.sha256 == sha256, Prediction.status == PredictionStatus.done.value)
        .order_by(Prediction.created_at.desc())
        .limit(1)
    )
    if body.predicted_class:
        query = query.where(Prediction.label == body.predicted_class)
    return await session.scalar(query)


async def create_classic_feedback(*, session: AsyncSession, owner_id: int, body: ClassicFeedbackCreate) -> Feedback:
    """Stores what a classic client sent, linked to my latest matching prediction when there is one
    (``latest_matching_prediction``). When that prediction is deleted (with its image) before the
    feedback is committed, the feedback is stored unlinked rather than lost. Raises 401 when my
    account was deleted meanwhile."""
    judged = await latest_matching_prediction(session=session, owner_id=owner_id, body=body)
    while True:
        feedback = Feedback(
            owner_id=owner_id,
            prediction_id=judged.id if judged else None,
            model_name=judged.model_name if judged else None,
            model_version=judged.model_version if judged else None,
            predicted_label=judged.label if judged else None,
            comment=body.feedback,
            predicted_class=body.predicted_class,
            score=body.score,
            image_file_name=body.image_file_name,
        )
        session.add(feedback)
        try:
            await session.commit()
        except sqlalchemy.exc.IntegrityError as exc:
            await session.rollback()
            constraint = violated_constraint(exc)
            if constraint == _OWNER_FK:
                raise HTTPException(status_code=401, detail=OWNER_GONE) from None
            if constraint != _PREDICTION_FK or judged is None:
                raise
            judged = None
            continue
        return feedback


async def list_feedback(
    *, session: AsyncSession, owner_id: int | None, page: KeysetPage, prediction_ids: list[uuid.UUID] | None = None
) -> tuple[list[Feedback], int | None, str | None]:
    """A page of a person's feedback (``owner_id=None``: everyone's, for admins), newest first,
    only on ``prediction_ids`` when given; the count when asked; the next page's cursor."""
    where = [] if owner_id is None else [Feedback.owner_id == owner_id]
    if prediction_ids is not None:
        where.append(Feedback.prediction_id.in_(prediction_ids))
    return await keyset_page(session, Feedback, *where, page=page)


async def backfill_examples(*, session: AsyncSession, test_share: float) -> int:
    """Once, when there are no examples yet: one per labelled verdict given before examples
    existed; how many. Commits."""
    if await session.scalar(select(LabelledExample.id).limit(1)) is not None:
        return 0
    labelled_verdicts = (
        select(
            Image.sha256,
            Prediction.model_name,
            Feedback.correct_label,
            Feedback.owner_id,
            Feedback.id,
        )
        .join(Prediction, Feedback.prediction_id == Prediction.id)
        .join(Job, Prediction.job_id == Job.id)
        .join(Image, Job.image_id == Image.id)
        .where(Feedback.correct_label.is_not(None))
        .order_by(Feedback.created_at)
    )
    added = 0
    for sha256, model_name, label, owner_id, feedback_id in await session.execute(labelled_verdicts):
        labelled = examples.example(
            model_name=model_name,
            sha256=sha256,
            label=str(label),
            source="verdict",
            owner_id=owner_id,
            test_share=test_share,
            feedback_id=feedback_id,
        )
        await examples.record(session=session, example=labelled)
        added += 1
    await session.commit()
    return added
