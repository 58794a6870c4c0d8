"""Users' labels as training data: each label of an image (a verdict with a label, or the
uploader's own ``ground_truth``) is a row of its model, and the model's example of that content is
its latest label. A content is assigned to ``train`` or ``test`` once, from its hash, so an image
keeps its split across users, re-uploads and later labels."""

from __future__ import annotations

import uuid
from typing import Any, Literal, cast

from sqlalchemy import Table, bindparam, delete, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from api.app.core.db import utcnow
from api.app.core.driver import DriverStatement
from api.app.examples.models import LabelledExample

DEFAULT_TEST_SHARE = 0.2
Split = Literal["train", "test"]
Source = Literal["verdict", "ground_truth"]


def split_of(sha256: str, test_share: float) -> Split:
    """``test`` for a ``test_share`` of images, ``train`` for the rest, by the first 64 bits of
    the image's SHA-256 read as a fraction of 2**64: uniform over images, the same on every run
    and machine (the way TensorFlow Datasets and Google's ML guides split by a hash of an id)."""
    return "test" if int(sha256[:16], 16) / 2**64 < test_share else "train"


_COLUMNS = ("id", "model_name", "sha256", "label", "source", "owner_id", "feedback_id", "image_id")
_table = cast(Table, LabelledExample.__table__)
_earlier_split = (
    select(LabelledExample.split)
    .where(
        LabelledExample.sha256 == bindparam("sha256", type_=_table.c.sha256.type),
        LabelledExample.model_name == bindparam("model_name", type_=_table.c.model_name.type),
    )
    .limit(1)
    .scalar_subquery()
)
_NEW = insert(LabelledExample).values(
    {column: bindparam(column, type_=_table.c[column].type) for column in (*_COLUMNS, "created_at", "updated_at")}
    # Another row of the same content and model keeps its split, whatever the share is today.
    | {"split": func.coalesce(_earlier_split, bindparam("split", type_=_table.c.split.type))}
)
RECORD_VERDICT = _NEW.on_conflict_do_update(
    index_elements=["feedback_id"],
    index_where=LabelledExample.feedback_id.is_not(None),
    set_={column: _NEW.excluded[column] for column in ("label", "updated_at")},
)
"""Adds the example of a verdict, or gives the verdict's row its new label. Parameters:
``example``'s row."""
RECORD_GROUND_TRUTH = _NEW.on_conflict_do_update(
    index_elements=["image_id", "model_name"],
    index_where=LabelledExample.feedback_id.is_(None),
    set_={column: _NEW.excluded[column] for column in ("label", "owner_id", "updated_at")},
)
"""Adds the uploader's label of an image for a model, or replaces it. Parameters: ``example``'s row."""
RECORD_ON_DRIVER = DriverStatement(RECORD_GROUND_TRUTH)
"""``RECORD_GROUND_TRUTH`` for a transaction on the driver (``core.driver``): the ground truth
of a prediction."""


def example(
    *,
    model_name: str,
    sha256: str,
    label: str,
    source: Source,
    owner_id: int,
    test_share: float,
    feedback_id: uuid.UUID | None = None,
    image_id: uuid.UUID | None = None,
) -> dict[str, Any]:
    """The parameters of ``RECORD_VERDICT`` or ``RECORD_GROUND_TRUTH`` (by ``source``) for this label
    of this image for this model."""
    now = utcnow()
    return {
        "id": uuid.uuid4(),
        "model_name": model_name,
        "sha256": sha256,
        "label": label,
        "split": split_of(sha256, test_share),
        "source": source,
        "owner_id": owner_id,
        "feedback_id": feedback_id,
        "image_id": image_id,
        "created_at": now,
        "updated_at": now,
    }


async def record(*, session: AsyncSession, example: dict[str, Any]) -> None:
    """Adds ``example`` (see ``example``), or gives the row of the same verdict (or of the same
    image and model, for an uploader's label) its new label; a split stays as first assigned.
    Does not commit: it goes with the verdict or upload."""
    statement = RECORD_VERDICT if example["source"] == "verdict" else RECORD_GROUND_TRUTH
    await session.execute(statement, example)


async def forget_verdict(*, session: AsyncSession, feedback_id: uuid.UUID) -> None:
    """Deletes the example of a verdict that no longer gives a label ("wrong" without the right
    one). Does not commit: it goes with the verdict."""
    await session.execute(delete(LabelledExample).where(LabelledExample.feedback_id == feedback_id))


async def counts(*, session: AsyncSession, model_name: str) -> dict[str, int]:
    """Examples (labelled images, by content) per split of a model: {"train": n, "test": m}."""
    rows = await session.execute(
        select(LabelledExample.split, func.count(LabelledExample.sha256.distinct()))
        .where(LabelledExample.model_name == model_name)
        .group_by(LabelledExample.split)
    )
    return {"train": 0, "test": 0, **{split: int(n) for split, n in rows}}
