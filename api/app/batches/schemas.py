from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict


class BatchCounts(BaseModel):
    images: int
    """Distinct images to classify (identical files count once)."""
    queued: int
    """Waiting for their turn or in the queue."""
    running: int
    done: int
    """Answered by at least one of the batch's models (``partly_answered`` of them not by all)."""
    failed: int
    """Failed, or expired before a worker answered."""
    cancelled: int
    """Cancelled before they were queued."""
    skipped: int
    """Files that were no acceptable image, or ids that were not the user's images."""
    deleted: int
    """Files accepted whose image was deleted since (``DELETE /v1/images/{id}``), with its answers."""
    partly_answered: int = 0
    """Of ``done``, the images some model's answer is missing for (it failed, expired or was
    cancelled: their result rows say why)."""
    eta_seconds: int | None
    """Seconds left at the pace of the last minute; 0 when nothing is left, None before any answer
    and while the batch waits for a version no live worker serves (``BatchDetail.waiting_for``)."""


class BatchPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    status: str
    """``receiving`` while the request stores its files, ``running``, ``done`` or ``cancelled``."""
    models: list[str]
    entries: int
    """Files and ids received; while ``receiving`` (and for a batch cancelled then), those its
    request announced, of which fewer may have been stored (``fully_received``)."""
    fully_received: bool
    """Every file and id its request sent was stored; False while ``receiving``, and for a batch
    cancelled before then (by its owner, or because its request failed or its process stopped):
    such a batch may be sent again (with its ``Idempotency-Key``, it then makes a new batch)."""
    created_at: datetime
    finished_at: datetime | None


class BatchDetail(BatchPublic):
    counts: BatchCounts
    waiting_for: list[str] = []
    """Model versions (``name@version``) of a running batch with images still queued that no live
    worker serves now (disabled or without a worker): those images wait, nothing is lost, and they
    go on once a worker serves the version again (or the batch is cancelled). A retired version's
    images are expired instead, with the reason, once no live worker has it loaded."""


class BatchesPublic(BaseModel):
    data: list[BatchPublic]
    count: int


ResultStatus = Literal["pending", "queued", "done", "failed", "expired", "cancelled", "skipped", "deleted"]
"""A result row's status: its prediction's as stored (``PredictionStatus`` but ``running``, which
only a job's own page reads from the worker), ``skipped`` or ``deleted``."""


class BatchResult(BaseModel):
    file_name: str
    sha256: str
    model: str
    """Empty for a skipped file."""
    version: int | None
    status: str
    """A prediction's status, ``skipped`` (``error`` says why), or ``deleted`` (its image was
    deleted after the batch received it, with its answers)."""
    label: str | None
    score: float | None
    top_5: list[dict[str, object]]
    error: str | None


class BatchResults(BaseModel):
    """A page of a batch's results, in the batch's order (its files', then each file's models')."""

    batch_id: uuid.UUID
    status: str
    """The batch's status."""
    data: list[BatchResult]
    count: int
    """Result rows in all (of the ``status`` asked for), on every page."""
    next_cursor: str | None = None
    """The ``cursor`` of the next page; None on the last one."""
