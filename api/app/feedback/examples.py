"""Users' labels as training data: each labelled image (a verdict with a label, or the uploader's
own ``ground_truth``) becomes one example per model, assigned to ``train`` or ``test`` once, from
its hash, so an image keeps its split across users, re-uploads and later labels."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from api.app.core.db import utcnow
from api.app.feedback.models import Feedback, LabelledExample
from api.app.images.models import Image
from api.app.predictions.models import Job, Prediction

DEFAULT_TEST_SHARE = 0.2
Split = Literal["train", "test"]
Source = Literal["verdict", "ground_truth"]


def split_of(sha256: str, test_share: float) -> Split:
    """``test`` for a ``test_share`` of images, ``train`` for the rest, by the first 64 bits of
    the image's SHA-256 read as a fraction of 2**64: uniform over images, the same on every run
    and machine (the way TensorFlow Datasets and Google's ML guides split by a hash of an id)."""
    return "test" if int(sha256[:16], 16) / 2**64 < test_share else "train"


async def record(
    *,
    session: AsyncSession,
    model_name: str,
    sha256: str,
    label: str,
    source: Source,
    owner_id: int,
    test_share: float,
    feedback_id: uuid.UUID | None = None,
    image_id: uuid.UUID | None = None,
) -> None:
    """Adds the example, or gives an existing one (same image, same model) this label and origin;
    its split stays as first assigned. Does not commit: it goes with the verdict or upload."""
    now = utcnow()
    statement = insert(LabelledExample).values(
        id=uuid.uuid4(),
        model_name=model_name,
        sha256=sha256,
        label=label,
        split=split_of(sha256, test_share),
        source=source,
        owner_id=owner_id,
        feedback_id=feedback_id,
        image_id=image_id,
        created_at=now,
        updated_at=now,
    )
    await session.execute(
        statement.on_conflict_do_update(
            index_elements=["sha256", "model_name"],
            set_={
                "label": statement.excluded.label,
                "source": statement.excluded.source,
                "owner_id": statement.excluded.owner_id,
                "feedback_id": statement.excluded.feedback_id,
                "image_id": statement.excluded.image_id,
                "updated_at": now,
            },
        )
    )


async def examples(
    *, session: AsyncSession, model_name: str | None, split: Split | None = None, since: datetime | None = None
) -> list[LabelledExample]:
    """The examples of a model (every model's when None), of one split when given, labelled after
    ``since`` when given; oldest first."""
    query = select(LabelledExample).order_by(LabelledExample.updated_at, LabelledExample.id)
    if model_name is not None:
        query = query.where(LabelledExample.model_name == model_name)
    if split is not None:
        query = query.where(LabelledExample.split == split)
    if since is not None:
        query = query.where(LabelledExample.updated_at > since)
    return list(await session.scalars(query))


async def counts(*, session: AsyncSession, model_name: str) -> dict[str, int]:
    """Examples per split of a model: {"train": n, "test": m}."""
    rows = await session.execute(
        select(LabelledExample.split, func.count())
        .where(LabelledExample.model_name == model_name)
        .group_by(LabelledExample.split)
    )
    return {"train": 0, "test": 0, **{split: int(n) for split, n in rows.tuples()}}


async def backfill(*, session: AsyncSession, test_share: float) -> int:
    """Once, when there are no examples yet: one per image and model from the verdicts given
    before examples existed, each with its image's latest label; how many. Commits."""
    if await session.scalar(select(LabelledExample.id).limit(1)) is not None:
        return 0
    latest = (
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
        .distinct(Image.sha256, Prediction.model_name)
        .order_by(Image.sha256, Prediction.model_name, Feedback.created_at.desc())
    )
    added = 0
    for sha256, model_name, label, owner_id, feedback_id in (await session.execute(latest)).tuples():
        await record(
            session=session,
            model_name=model_name,
            sha256=sha256,
            label=str(label),
            source="verdict",
            owner_id=owner_id,
            test_share=test_share,
            feedback_id=feedback_id,
        )
        added += 1
    await session.commit()
    return added
