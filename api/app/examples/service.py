"""Users' labels as training data: each labelled image (a verdict with a label, or the uploader's
own ``ground_truth``) becomes one example per model, assigned to ``train`` or ``test`` once, from
its hash, so an image keeps its split across users, re-uploads and later labels."""

from __future__ import annotations

import uuid
from typing import Any, Literal, cast

from sqlalchemy import Table, bindparam, func, select
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


_COLUMNS = ("id", "model_name", "sha256", "label", "split", "source", "owner_id", "feedback_id", "image_id")
_table = cast(Table, LabelledExample.__table__)
_NEW = insert(LabelledExample).values(
    {column: bindparam(column, type_=_table.c[column].type) for column in (*_COLUMNS, "created_at", "updated_at")}
)
RECORD = _NEW.on_conflict_do_update(
    index_elements=["sha256", "model_name"],
    set_={
        column: _NEW.excluded[column]
        for column in ("label", "source", "owner_id", "feedback_id", "image_id", "updated_at")
    },
)
"""Adds an example, or gives an existing one (same image, same model) the new label and origin;
its split stays as first assigned. Parameters: ``example``'s row."""
RECORD_ON_DRIVER = DriverStatement(RECORD)
"""``RECORD`` for a transaction on the driver (``core.driver``): the ground truth of a prediction."""


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
    """The parameters of ``RECORD`` for this label of this image for this model."""
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
    """Adds ``example`` (see ``example``), or gives an existing one (same image, same model) its
    label and origin; its split stays as first assigned. Does not commit: it goes with the verdict
    or upload."""
    await session.execute(RECORD, example)


async def counts(*, session: AsyncSession, model_name: str) -> dict[str, int]:
    """Examples per split of a model: {"train": n, "test": m}."""
    rows = await session.execute(
        select(LabelledExample.split, func.count())
        .where(LabelledExample.model_name == model_name)
        .group_by(LabelledExample.split)
    )
    return {"train": 0, "test": 0, **{split: int(n) for split, n in rows}}
