"""The job and result messages exchanged by the API and the model service over Redis Streams.

A job names exactly one model version; a request for several models becomes several jobs that
share a ``job_id``. Stream entries are flat ``field -> bytes`` maps, so each message is stored as a
JSON ``meta`` field plus, for jobs, the raw image bytes in ``image``.
"""

from __future__ import annotations

import json
import re
import time
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Self

from pydantic import BaseModel, Field

if TYPE_CHECKING:  # the UI imports these messages without redis installed
    from contracts.streams import StreamFields


class PredictionStatus(StrEnum):
    """Life cycle of one model's answer to a job."""

    pending = "pending"
    """A batch's job waiting in PostgreSQL for its turn in the queue (batches go a few at a time,
    so they never put people's own requests behind them)."""
    queued = "queued"
    running = "running"
    done = "done"
    failed = "failed"
    expired = "expired"
    cancelled = "cancelled"
    """A batch's job cancelled before it was queued."""

    @property
    def terminal(self) -> bool:
        return self in (
            PredictionStatus.done,
            PredictionStatus.failed,
            PredictionStatus.expired,
            PredictionStatus.cancelled,
        )


class LabelScore(BaseModel):
    """One class of a top-k answer."""

    label: str
    score: float


class Timings(BaseModel):
    """Where the time of one prediction went, in milliseconds."""

    queue_ms: float = 0.0
    preprocess_ms: float = 0.0
    inference_ms: float = 0.0
    total_ms: float = 0.0
    batch_size: int = 1


class JobMessage(BaseModel):
    """A request for one model version to classify one image."""

    job_id: str
    prediction_id: str
    model: str
    version: int
    sha256: str
    request_id: str = ""
    enqueued_at: float = Field(default_factory=time.time)
    deadline: float
    shadow_of: str = ""
    """For a shadow version's copy: the id of the prediction it mirrors (its answer is kept for
    comparison, never returned); empty for a prediction the user asked for."""
    evaluation: str = ""
    """For an offline evaluation's job (a version run on users' labelled images to compare it with
    another): the evaluation's id; its answer is kept with the evaluation, never returned."""
    image: bytes = Field(default=b"", exclude=True)

    def expired(self, now: float | None = None) -> bool:
        return (now if now is not None else time.time()) > self.deadline

    def to_fields(self) -> StreamFields:
        return {"meta": self.model_dump_json().encode(), "image": self.image}

    @classmethod
    def from_fields(cls, fields: dict[bytes, bytes]) -> Self:
        meta = json.loads(fields[b"meta"])
        return cls(**meta, image=fields.get(b"image", b""))


class ResultMessage(BaseModel):
    """A model version's answer (or failure) for one job."""

    job_id: str
    prediction_id: str
    model: str
    version: int
    sha256: str = ""
    status: PredictionStatus
    top_k: list[LabelScore] = []
    error: str | None = None
    worker_id: str = ""
    request_id: str = ""
    random_weights: bool = False
    timings: Timings = Timings()
    delivery: int = 1
    """How many times the job had been delivered to a worker (more than one: reclaimed)."""
    dead_lettered: bool = False
    shadow_of: str = ""
    """As the job's: the answer of a shadow copy."""
    evaluation: str = ""
    """As the job's: the answer to an evaluation's job."""

    @classmethod
    def answering(cls, source: JobMessage | ResultMessage, status: PredictionStatus, **fields: Any) -> Self:
        """An answer for the prediction ``source`` names: the job itself, or another answer to it."""
        return cls(
            job_id=source.job_id,
            prediction_id=source.prediction_id,
            model=source.model,
            version=source.version,
            sha256=source.sha256,
            request_id=source.request_id,
            shadow_of=source.shadow_of,
            evaluation=source.evaluation,
            status=status,
            **fields,
        )

    def to_fields(self) -> StreamFields:
        return {"meta": self.model_dump_json().encode()}

    @classmethod
    def from_fields(cls, fields: dict[bytes, bytes]) -> Self:
        return cls.model_validate_json(fields[b"meta"])


NOT_TRAINED_YET = "not trained yet"
"""How ``ModelState.reason`` begins for a version with training options whose model file is not
written: the API then tells users it has not been trained yet, not that it is missing."""
FAILED_TO_LOAD = "failed to load"
"""How ``ModelState.reason`` begins for a version whose files are there but would not load (a
damaged or incompatible file): users read that it failed to load, not that it is missing."""
BEING_TRAINED = "being trained here: {epoch} of {epochs} epochs done"
"""Part of such a reason while ``python -m model.prepare`` trains the version (``make run`` serves
meanwhile): how far it is, read by ``being_trained``."""
_BEING_TRAINED = re.compile(r"being trained here: (\d+) of (\d+) epochs done")
_BEING_TRAINED_PART = re.compile(r"; being trained here: \d+ of \d+ epochs done")


def being_trained(reason: str) -> tuple[int, int] | None:
    """(epochs done, epochs) from a reason holding ``BEING_TRAINED``; None from any other."""
    match = _BEING_TRAINED.search(reason)
    return (int(match[1]), int(match[2])) if match else None


def without_progress(reason: str) -> str:
    """The reason without its ``BEING_TRAINED`` part: what two workers reading the same missing
    file at different epochs both say."""
    return _BEING_TRAINED_PART.sub("", reason)


class ModelState(BaseModel):
    """What one worker says about one model version it tried to load."""

    name: str
    version: int
    ready: bool
    reason: str | None = None
    num_classes: int = 0
    random_weights: bool = False
    heldout_accuracy: float | None = None
    """Top-1 accuracy on its training run's held-out set (``metrics.json`` beside the model file,
    ``test_accuracy``); None without a training record."""
    heldout_set: str | None = None
    """Which drawings that held-out set holds (``heldout_set_id`` of the record): two versions'
    held-out accuracies are comparable only when it is the same."""
    heldout_size: int | None = None
    """How many drawings that held-out set holds (the record's ``samples.test``)."""
    memory_mib: float | None = None
    """How much the worker's resident memory grew while it loaded and warmed up this version, in
    MiB: approximate, as the process's other work counts too (the first version loaded also
    carries its runtime's own start-up)."""


class Heartbeat(BaseModel):
    """A worker's periodic proof of life, listing the model versions it serves."""

    worker_id: str
    pid: int
    hostname: str
    started_at: float
    sent_at: float = Field(default_factory=time.time)
    models: list[ModelState] = []
    inference_cpu_seconds: float = 0.0
    """The worker process's CPU time (user + system, all threads) during the models' inference
    calls since it started: the inference, plus whatever its other threads did meanwhile (little,
    unless a new model version was being loaded). With the process's own CPU time it splits the
    worker's cost into inference and the rest (decoding, resizing, messaging), as
    ``python -m bench e2e`` reports."""


class ExplainerHeartbeat(BaseModel):
    """An explainer's periodic proof of life (``keys.explainer_key``, with a TTL)."""

    explainer_id: str
    pid: int
    models: list[str] = []
    """``name@version`` of every Keras twin whose Grad-CAM it holds."""
    not_explainable: dict[str, str] = {}
    """Twins it was asked to hold whose model cannot be explained, by ``name@version``, with why
    (no convolutional layer): a property of the model file, not of this explainer, so the API
    answers 422 for them rather than waiting for an explainer that would hold them."""
    loading: list[str] = []
    """``name@version`` of the twins it is building now: requests for them wait, not 503."""
    revision: int | None = None
    """The registry revision whose twins it holds or is building (None: none read yet, or an
    explainer from before this field): one behind the API's has a change still to follow."""


class ExplanationStatus(StrEnum):
    ok = "ok"
    not_explainable = "not_explainable"
    """The version has no Keras graph to take gradients of (its twin is gone, say): a 422."""
    failed = "failed"
    """The image could not be read: the error says why (a 422)."""
    error = "error"
    """The computation failed in the explainer, a fault of the portal's own logged there (a 502);
    the error says no more, so no internals reach the user."""


EXPLANATION_GRID = 56
"""Side of the heatmap an explainer returns, in cells over the whole uploaded image (rows follow
its height, columns its width): fine enough for a 14x14 summary and a smooth overlay."""


class ExplainRequest(BaseModel):
    """A request for the Grad-CAM heatmap of one served version's top-1 class on one image."""

    request_id: str
    model: str
    """The served version the prediction came from (the cache is kept under it)."""
    version: int
    twin: str
    """``name@version`` of the Keras model whose gradients are taken (the stream's)."""
    sha256: str
    label: str
    """The class to explain: the prediction's top-1 label."""
    deadline: float
    """Epoch seconds after which nobody waits for the answer (it is then not computed)."""
    owner_id: int | None = None
    """The user who asked: the answer is cached for them alone (None: not cached)."""
    image: bytes = Field(default=b"", exclude=True)

    def to_fields(self) -> StreamFields:
        return {"meta": self.model_dump_json().encode(), "image": self.image}

    @classmethod
    def from_fields(cls, fields: dict[bytes, bytes]) -> Self:
        meta = json.loads(fields[b"meta"])
        return cls(**meta, image=fields.get(b"image", b""))


class Explanation(BaseModel):
    """An explainer's answer: a heatmap over the whole image, each cell in [0, 1] (1: the region
    that raised the class's score most), EXPLANATION_GRID cells a side."""

    model: str
    version: int
    twin: str
    sha256: str
    label: str
    status: ExplanationStatus
    method: str = "grad-cam"
    layer: str = ""
    """The convolutional layer whose activations were weighted."""
    heatmap: list[list[float]] = []
    error: str | None = None
    explainer_id: str = ""
    compute_ms: float = 0.0
    from_cache: bool = False
    """The explainer found the answer already cached (asked twice) and did not compute it again."""
