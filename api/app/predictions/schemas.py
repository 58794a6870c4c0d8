from __future__ import annotations

import uuid
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from contracts.messages import LabelScore


class PredictRequest(BaseModel):
    image_id: uuid.UUID
    models: list[str] = Field(
        default_factory=list,
        description='Model references such as "mobilenet_v2" or "sketch@2"; empty: the default model.',
        max_length=10,
    )


class JobAccepted(BaseModel):
    job_id: uuid.UUID
    status: str


class TimingsPublic(BaseModel):
    queue_ms: float | None = None
    preprocess_ms: float | None = None
    inference_ms: float | None = None
    total_ms: float | None = None
    batch_size: int | None = None


class PredictionPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    model: str
    version: int
    status: str
    label: str | None
    score: float | None
    top_k: list[LabelScore]
    cached: bool
    random_weights: bool
    error: str | None
    timings: TimingsPublic


class JobPublic(BaseModel):
    job_id: uuid.UUID
    image_id: uuid.UUID
    status: str
    created_at: datetime
    finished_at: datetime | None
    results: list[PredictionPublic]


class JobsPublic(BaseModel):
    data: list[JobPublic]
    count: int


class ClassicPrediction(BaseModel):
    success: bool
    prediction: str | None
    score: float | None
    image_file_name: str
    model: str | None
    version: int | None
    job_id: uuid.UUID
    results: dict[str, PredictionPublic]
