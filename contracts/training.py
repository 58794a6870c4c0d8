"""Training runs between the API and the training worker (``python -m model.trainer``): a job on
one stream, the trainer's events on another, a cancel flag and a liveness key per run."""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from typing import TYPE_CHECKING, Any, Literal, Self, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator

if TYPE_CHECKING:  # the UI reads this module and has no Redis client installed
    from contracts.streams import StreamFields

STOPPED = "the trainer was stopped during the run"
"""A run's error when its trainer was told to stop (SIGTERM: a deploy, a restart) while it ran:
no fault of the run, so the retraining trigger's back-off does not count it."""
JOB_STREAM = "training:jobs"
JOB_GROUP = "trainers"
EVENT_STREAM = "training:events"
EVENT_GROUP = "api"
EVENT_STREAM_MAXLEN = 10_000
ALIVE_TTL_S = 15
"""A running run's liveness key lives this long; the trainer renews it every few seconds, so a
killed trainer's run is failed at the API's first check (every RETRAIN_CHECK_SECONDS) after this
long."""


def cancel_key(run_id: str) -> str:
    """Set (by the API) when an admin cancels the run; the trainer checks it every second or so
    while it trains (``model.training.train_sketch.STOP_CHECK_EVERY_S``) and after each epoch."""
    return f"training:cancel:{run_id}"


def alive_key(run_id: str) -> str:
    """Held by the trainer while it runs the run."""
    return f"training:alive:{run_id}"


def ended_key(run_id: str) -> str:
    """Set by the trainer before it reports the end of a run and lets go of its liveness key: a
    run whose end is on its way to the API is not taken for one whose trainer died."""
    return f"training:ended:{run_id}"


ENDED_TTL_S = 7 * 86400

RECORDS_KEY = "training:records"
"""A hash from a trained version's folder under TRAINED_DIR (``sketch/v1``) to its
``metrics.json``, kept by the training worker: the API shows from it the training record of a
version no run trained (``python -m model.prepare``, the train_sketch command line)."""
RECORDS_SCAN_S = 30.0
"""How often the training worker looks for new or changed ``metrics.json`` files."""

_TRAINED_FILE = re.compile(r"^\{trained_dir\}/(?P<folder>[^/]+(/[^/]+)*)/[^/]+$")


def record_folder(file_template: str) -> str | None:
    """The folder under TRAINED_DIR of a registry file template, the field of ``RECORDS_KEY``:
    ``sketch/v1`` for ``{trained_dir}/sketch/v1/model.keras``; None for a file elsewhere."""
    match = _TRAINED_FILE.match(file_template)
    return match["folder"] if match else None


Architecture = Literal["compact", "deep", "vgg"]
"""The sketch CNNs ``model.training.train_sketch.build_model`` builds."""
ARCHITECTURES: tuple[str, ...] = get_args(Architecture)


class TrainingOptions(BaseModel):
    """How a sketch version is trained. Strict, and no other keys: a run takes minutes, so a
    misspelt option or ``"yes"`` for a switch is refused (422) rather than guessed or dropped."""

    model_config = ConfigDict(strict=True, extra="forbid")

    arch: Architecture = "compact"
    epochs: int = Field(default=12, ge=1, le=200)
    batch_size: int = Field(default=128, ge=8, le=4096)
    learning_rate: float = Field(default=2e-3, gt=0, le=1)
    seed: int = Field(default=1234, ge=0, le=2**31 - 1)
    per_category: int = Field(default=3000, ge=10, le=100_000)
    """QuickDraw drawings per category (the base data) at most."""
    canvas_share: float = Field(default=0.3, ge=0.0, le=1.0)
    """Share of the training drawings added again as the UI canvas renders them."""
    augment: bool = True
    """Random flips, small rotations and zooms of the training drawings, new each epoch."""
    flip_only: bool = False
    """With ``augment``: flips only (the service already centres and scales every drawing)."""
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=1.0)
    weight_decay: float = Field(default=0.0, ge=0.0, le=1.0)
    """AdamW's decoupled weight decay; 0: plain Adam."""
    warmup: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Share of the steps over which the learning rate rises from a tenth of its peak before its
    cosine decay."""
    mixed_precision: bool = False
    """Train in bfloat16 with float32 weights (about twice as fast with AMX) where the CPU has
    bfloat16 arithmetic (AMX or AVX512-BF16), in float32 elsewhere (emulated bfloat16 is about ten
    times slower); the saved model computes in float32."""
    flip_average: bool = False
    """The saved model reads each drawing with its mirror image and averages the two answers
    (horizontal-flip test-time augmentation: twice the inference work)."""


class TrainingJob(BaseModel):
    """Train version ``version`` of sketch model ``model`` on ``categories``: QuickDraw's drawings
    plus users' labelled ``train`` examples exported under ``feedback_dir`` (the export's
    ``<dir>/<model>``), into ``{trained_dir}/<model>/v<version>/``."""

    run_id: str
    model: str
    version: int
    categories: list[str]
    options: TrainingOptions
    feedback_dir: str | None = None
    enqueued_at: float = Field(default_factory=time.time)

    def to_fields(self) -> StreamFields:
        return {"meta": self.model_dump_json().encode()}

    @classmethod
    def from_fields(cls, fields: dict[bytes, bytes]) -> Self:
        return cls.model_validate_json(fields[b"meta"])


class TrainingEvent(BaseModel):
    """What the trainer says of a run: it started, got so far within an epoch (``progress``, every
    few seconds), finished an epoch, or ended."""

    run_id: str
    kind: Literal["started", "progress", "epoch", "done", "failed", "cancelled"]
    trainer: str = ""
    epoch: int = 0
    """``epoch``: the epoch finished; ``progress``: the epoch in progress (both 1-based)."""
    epochs: int = 0
    step: int = 0
    """``progress``: the training steps (batches) done in the epoch in progress."""
    steps: int = 0
    """``progress``: the training steps in an epoch."""
    numbers: dict[str, float | None] = {}
    """``epoch``: its loss, accuracy, val_loss, val_accuracy and seconds since the start; None for a
    number that is not finite (NaN or infinite: the training diverged). ``progress``: the seconds
    since the start."""
    record: dict[str, Any] | None = None
    """When done: the training record (``metrics.json``)."""
    error: str | None = None
    at: float = Field(default_factory=time.time)

    @field_validator("numbers")
    @classmethod
    def _finite_or_none(cls, numbers: dict[str, float | None]) -> dict[str, float | None]:
        # JSON has no NaN or infinity: pydantic writes them as null, which a float refused, so a
        # diverged epoch was dropped. Made None here, so the event reads the same on both sides of
        # the stream, and its numbers go into PostgreSQL's JSONB (which refuses NaN) as they are.
        return {name: None if value is None or not math.isfinite(value) else value for name, value in numbers.items()}

    def to_fields(self) -> StreamFields:
        return {"meta": self.model_dump_json().encode()}

    @classmethod
    def from_fields(cls, fields: dict[bytes, bytes]) -> Self:
        return cls.model_validate_json(fields[b"meta"])


def heldout_set_id(categories: list[str], per_category: int) -> str:
    """Names the held-out set of a sketch training record: training cuts its held-out drawings
    from the first ``per_category`` drawings of each category with a fixed seed
    (``model.training.train_sketch.load_split``: ``REFERENCE_PER_CATEGORY``, 3,000, whatever the
    run's own drawings per category; a record's ``heldout_per_category``), so records with the same
    categories (in order) and this number were scored on the same drawings. A SHA-256 digest, 16
    hex digits."""
    text = json.dumps({"categories": categories, "per_category": per_category}, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
