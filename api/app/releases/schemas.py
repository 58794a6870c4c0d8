from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, StrictBool

from api.app.core.fields import INT32_MAX, RequestBody
from api.app.predictions.schemas import EvaluationPublic
from api.app.registry.schemas import Reason


class VersionStats(BaseModel):
    version: int
    channel: str
    heldout_accuracy: float | None
    """Top-1 accuracy on its training run's held-out set, as its workers report it."""
    heldout_set: str | None = None
    """Which drawings that held-out set holds: held-out accuracies are compared only on the same."""
    heldout_size: int | None = None
    """How many drawings it holds."""
    feedback: int
    """Users' verdicts on its answers (correct or wrong)."""
    feedback_accuracy: float | None
    """Share of those verdicts saying correct; None below ``min_feedback`` verdicts."""
    answers: int
    """Answers given in the period: to people (as a canary or stable version) and as a shadow's copies."""
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    mean_score: float | None
    """Mean top-1 score of those answers."""
    classes: int | None = None
    """How many classes it answers with, as its workers report it, or as the labels a worker
    published once say (``model_versions.labels``); None when neither is known."""


class Comparison(BaseModel):
    model: str
    candidate: VersionStats
    baseline: VersionStats
    days: int
    shadow_answers: int
    """Copies of the baseline's requests the candidate answered as a shadow, both answers done."""
    shadow_agreement: float | None
    """Share of those where the candidate's top-1 label equals the baseline's."""
    evaluation: EvaluationPublic | None = None
    """The latest finished evaluation of these two versions on the same labelled images (POST
    .../evaluations starts one); its accuracies count in the verdict once each version answered
    at least 20 images."""
    margin: float
    """How much lower the candidate's accuracy may be (PROMOTION_MARGIN)."""
    verdict: Literal["worse", "not_worse", "no_evidence"]
    """``worse``: an accuracy both versions have is lower for the candidate by more than the margin,
    or the candidate knows fewer classes (it could not answer some of what people send today);
    ``not_worse``: at least one accuracy is known and none is; ``no_evidence``: none is known for
    both. Held-out accuracies of versions with different numbers of classes are not compared
    (measured on different tasks)."""
    reasons: list[str]


class Promotion(RequestBody):
    reason: Reason
    force: StrictBool = False
    """Promote even when the comparison says worse (the numbers go into the audit trail)."""


class EvaluationRequest(RequestBody):
    candidate: int = Field(ge=1, le=INT32_MAX)
    baseline: int | None = Field(default=None, ge=1, le=INT32_MAX, description="default: the stable version")


class ServingVersion(BaseModel):
    """A version as operators watch it: its registry state and what the workers report."""

    name: str
    version: int
    display_name: str
    channel: str
    enabled: bool
    weight: int
    weight_share: float
    """Share of the model's routed requests its weight gives it (0 to 1)."""
    workers: int
    """Live workers serving it."""
    memory_mib: float | None
    """Memory loading it took on a worker (the most of any), in MiB."""
    unavailable_reason: str | None
    """Why no worker serves it, as the workers report it; None when served."""
    heldout_accuracy: float | None
    feedback: int
    """Users' verdicts on its answers."""
    feedback_accuracy: float | None
    """Share of those saying correct; None below 20 verdicts."""


class ServingPublic(BaseModel):
    revision: int
    versions: list[ServingVersion]
