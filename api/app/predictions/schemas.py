"""What the prediction routes take and return."""

from __future__ import annotations

import uuid
from collections.abc import Set
from datetime import datetime
from typing import Annotated, Self

from pydantic import BaseModel, ConfigDict, Field

from api.app.catalog.service import MAX_REF_LENGTH, MAX_REFS
from api.app.core.fields import RequestBody, Text
from api.app.images.schemas import ImagePublic
from api.app.predictions.models import Job, Prediction
from contracts.messages import LabelScore, PredictionStatus


class PredictRequest(RequestBody):
    image_id: uuid.UUID
    models: list[Annotated[str, Field(max_length=MAX_REF_LENGTH)]] = Field(
        default_factory=list,
        description='Model references such as "mobilenet_v2" or "sketch@2"; empty: the default model.',
        max_length=MAX_REFS,
    )
    ground_truth: Annotated[Text, Field(min_length=1, max_length=200)] | None = Field(
        default=None, description="Your own label for the image: one of the chosen models' labels."
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

    @classmethod
    def from_row(cls, p: Prediction, running: Set[uuid.UUID] = frozenset()) -> Self:
        """A stored prediction; ``running``: ids a worker has taken (a queued row then shows as running)."""
        return cls(
            id=p.id,
            model=p.model_name,
            version=p.model_version,
            status=PredictionStatus.running.value if p.id in running else p.status,
            label=p.label,
            score=p.score,
            top_k=[LabelScore(**t) for t in p.top_k or []],
            cached=p.cached,
            random_weights=p.random_weights,
            error=p.error,
            timings=TimingsPublic(
                queue_ms=p.queue_ms,
                preprocess_ms=p.preprocess_ms,
                inference_ms=p.inference_ms,
                total_ms=p.total_ms,
                batch_size=p.batch_size,
            ),
        )


class JobPublic(BaseModel):
    job_id: uuid.UUID
    image_id: uuid.UUID
    status: str
    created_at: datetime
    finished_at: datetime | None
    results: list[PredictionPublic]

    @classmethod
    def from_row(cls, job: Job, running: Set[uuid.UUID] = frozenset()) -> Self:
        """A stored job with its predictions (loaded with it); ``running`` as in ``PredictionPublic``."""
        status = job.status
        if status == PredictionStatus.queued.value and running:
            status = PredictionStatus.running.value
        return cls(
            job_id=job.id,
            image_id=job.image_id,
            status=status,
            created_at=job.created_at,
            finished_at=job.finished_at,
            results=[PredictionPublic.from_row(p, running) for p in job.predictions],
        )


class JobsPublic(BaseModel):
    data: list[JobPublic]
    count: int | None = Field(default=None, description="All of them, when asked for with total=true.")
    next_cursor: str | None = Field(default=None, description="Pass as cursor for the next page; None on the last.")


class ImageDetail(ImagePublic):
    """One upload with the newest jobs that predicted it (at most ``IMAGE_JOBS``, 50), newest
    first; the older ones are paged at ``GET /v1/predictions?image_id=``, from ``jobs_next_cursor``."""

    jobs: list[JobPublic] = Field(default_factory=list, description="The newest 50 jobs at most, newest first.")
    jobs_count: int = Field(default=0, description="All the jobs of the image, those listed or not.")
    jobs_next_cursor: str | None = Field(
        default=None,
        description="Pass as cursor to GET /v1/predictions?image_id= for the older jobs; None when all are listed.",
    )


class ClassicPrediction(BaseModel):
    success: bool
    prediction: str | None
    score: float | None
    image_file_name: str
    model: str | None
    version: int | None
    job_id: uuid.UUID
    results: dict[str, PredictionPublic]

    @classmethod
    def from_answers(cls, *, job_id: uuid.UUID, file_name: str, answers: list[PredictionPublic]) -> Self:
        """The one-call answer: the first model's label and score (rounded to 4 places) on top,
        every model's answer under ``results`` keyed ``name@version``."""
        first = answers[0]
        return cls(
            success=first.status == PredictionStatus.done.value,
            prediction=first.label,
            score=round(first.score, 4) if first.score is not None else None,
            image_file_name=file_name,
            model=first.model,
            version=first.version,
            job_id=job_id,
            results={f"{p.model}@{p.version}": p for p in answers},
        )


class EvaluationVersion(BaseModel):
    version: int
    answered: int
    """Images this version answered."""
    failed: int
    """Images it failed on or did not answer by the deadline."""
    pending: int
    """Images still to answer."""
    correct: int
    """Answers whose top-1 label is the users' label."""
    accuracy: float | None
    """correct ÷ answered; None before any answer."""
    latency_p50_ms: float | None = None


class EvaluationPublic(BaseModel):
    """Two versions run on the same labelled images (users' verdicts on the model's answers)."""

    id: uuid.UUID
    model: str
    status: str
    """``running``, ``done`` or ``cancelled``."""
    images: int
    """Labelled images it runs on (those deleted since it started are left out)."""
    removed: int = 0
    """Images deleted (with their owner, or by them) since it started."""
    requested_by: str
    created_at: datetime
    finished_at: datetime | None
    candidate: EvaluationVersion
    baseline: EvaluationVersion
