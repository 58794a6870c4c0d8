from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator

from api.app.core.fields import INT32_MAX, RequestBody, Text


class ExportRequest(RequestBody):
    """What to export."""

    kind: Literal["feedback"] = "feedback"
    """``feedback``: the images users labelled, ``<model>/<label>/<sha256>.<ext>``, and feedback.csv."""
    model: Annotated[Text, Field(min_length=1, max_length=64)] | None = None
    """Only this model's verdicts, e.g. ``sketch``; None: every model."""
    version: StrictInt | None = Field(default=None, ge=1, le=INT32_MAX)
    """Only this version of ``model`` (needs ``model``)."""
    since_last: StrictBool = False
    """Incremental: only verdicts given after the last finished export of the same kind, model and
    version (everything when there is none)."""

    @model_validator(mode="after")
    def _version_needs_model(self) -> ExportRequest:
        if self.version is not None and self.model is None:
            raise ValueError("version needs model")
        return self


class ExportPublic(BaseModel):
    """An export job and how far it got."""

    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    kind: str
    model: str | None
    version: int | None
    since_last: bool
    status: str
    """``queued``, ``running``, then ``done``, ``failed`` or ``cancelled``."""
    since: datetime | None
    """It holds verdicts given after this only (an incremental export that follows an earlier one)."""
    until: datetime | None
    """It holds verdicts given up to this only: when it started."""
    rows_total: int
    """Images and models to go through; known once it runs."""
    rows_done: int
    """Images and models gone through: written, or left out because their file is gone."""
    bytes_written: int
    """Size of the zip so far, in bytes."""
    summary: dict[str, Any] | None
    """examples (images written), by_model, superseded, unlabelled and missing verdicts."""
    error: str | None
    """Why it failed."""
    requested_by: str
    attempts: int
    """Processes that took it up: more than one when a process died running it."""
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None
    """When its process last said it was still at it."""
    download: str | None = None
    """Where to download the zip once ``done`` (until it is deleted, after EXPORT_KEEP_DAYS)."""

    @classmethod
    def from_row(cls, row: Any) -> ExportPublic:
        export = cls.model_validate(row)
        if export.status == "done" and row.path is not None:
            export.download = f"/v1/admin/exports/{export.id}/download"
        return export


class ExportsPublic(BaseModel):
    data: list[ExportPublic]
    count: int
