"""Every table, imported in one place for Alembic and for mapper configuration."""

from api.app.api_keys.models import ApiKey
from api.app.auth.models import RevokedToken
from api.app.batches.models import Batch, BatchItem
from api.app.drift.models import DriftSignal
from api.app.examples.models import LabelledExample
from api.app.exports.models import Export
from api.app.feedback.models import Feedback
from api.app.images.models import Image
from api.app.predictions.models import Evaluation, EvaluationAnswer, Job, Prediction, ShadowPrediction
from api.app.registry.models import ModelVersion, RegistryChange
from api.app.stats.models import (
    CorrectionStats,
    PredictionCounts,
    PredictionLatencyMonths,
    PredictionStatDelta,
    PredictionStats,
    VerdictStatDelta,
    VerdictStats,
)
from api.app.training.models import TrainingRun
from api.app.users.models import User

__all__ = [
    "ApiKey",
    "Batch",
    "BatchItem",
    "CorrectionStats",
    "DriftSignal",
    "Evaluation",
    "EvaluationAnswer",
    "Export",
    "Feedback",
    "Image",
    "Job",
    "LabelledExample",
    "ModelVersion",
    "Prediction",
    "PredictionCounts",
    "PredictionLatencyMonths",
    "PredictionStatDelta",
    "PredictionStats",
    "RegistryChange",
    "RevokedToken",
    "ShadowPrediction",
    "TrainingRun",
    "User",
    "VerdictStatDelta",
    "VerdictStats",
]
