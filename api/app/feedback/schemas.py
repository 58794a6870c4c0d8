from __future__ import annotations

import uuid
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, StrictBool, model_validator

from api.app.core.fields import RequestBody, Text, visible


class FeedbackCreate(RequestBody):
    prediction_id: uuid.UUID
    is_correct: StrictBool  # "yes" or 1 is not a verdict
    correct_label: Text | None = Field(default=None, max_length=200)
    comment: Text | None = Field(default=None, max_length=2000)


class ClassicFeedbackCreate(BaseModel):
    # Strict: a number, as described; lax validation also took true, false and numeric strings.
    score: float | None = Field(default=None, allow_inf_nan=False, strict=True)
    predicted_class: Text | None = Field(default=None, max_length=200)
    image_file_name: Text | None = Field(default=None, max_length=100)
    feedback: Text | None = Field(default=None, max_length=2000)

    @model_validator(mode="after")
    def says_something(self) -> ClassicFeedbackCreate:
        """A body without a score or any visible text would store a row that says nothing: 422."""
        texts = (self.predicted_class, self.image_file_name, self.feedback)
        if self.score is None and not any(visible(text) for text in texts):
            raise ValueError("Say something: give predicted_class, feedback, score or image_file_name.")
        return self


class FeedbackPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    owner_id: int
    prediction_id: uuid.UUID | None
    is_correct: bool | None
    correct_label: str | None
    comment: str | None
    predicted_class: str | None
    score: float | None
    image_file_name: str | None
    created_at: datetime
    model: str | None = None
    """The model version judged (``name@version``), in lists; None for classic feedback without a prediction."""


class FeedbacksPublic(BaseModel):
    data: list[FeedbackPublic]
    count: int | None = Field(default=None, description="All of them, when asked for with total=true.")
    next_cursor: str | None = Field(default=None, description="Pass as cursor for the next page; None on the last.")
