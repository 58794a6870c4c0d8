"""Model service settings, read from the environment or ``.env``."""

from __future__ import annotations

import os
import socket
from functools import lru_cache
from pathlib import Path

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from contracts import settings as contracts_settings
from contracts.registry import (
    DEFAULT_REGISTRY_PATH,
    ModelEntry,
    Registry,
    parse_model_ref,
)
from contracts.settings import RedisUrl

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class ModelRefInvalid(Exception):
    """SERVE_MODELS or EXPLAIN_MODELS names a version no registry has, a mistake no registry
    change mends; the message, one line, quotes the setting and says which reference."""


def _check_refs(variable: str, refs: str, known: list[ModelEntry], listing: str) -> None:
    """Raises ModelRefInvalid for the first reference of ``refs`` (``variable``'s value, comma
    separated ``name`` or ``name@version``) that is malformed or matches no entry of ``known``;
    ``listing`` ends its message."""
    try:
        wanted = [parse_model_ref(ref) for ref in refs.split(",") if ref.strip()]
    except ValueError as exc:
        raise ModelRefInvalid(f"{variable}={refs!r}: {exc}") from None
    for name, version in wanted:
        if not any(m.name == name and version in (None, m.version) for m in known):
            ref = name if version is None else f"{name}@{version}"
            raise ModelRefInvalid(f"{variable}={refs!r}: {ref!r} matches no model version in the registry; {listing}")


class ModelSettings(BaseSettings):
    """Everything a model worker process can be told."""

    model_config = SettingsConfigDict(
        env_file=".env", extra="ignore", use_attribute_docstrings=True, protected_namespaces=()
    )

    redis_url: RedisUrl = "redis://127.0.0.1:6379/0"
    """Redis URL shared with the API."""
    allow_redis_eviction: bool = False
    """Run on a Redis whose maxmemory-policy is not noeviction, which deletes queued jobs and
    results under memory pressure. False: the worker exits at start (and when it reconnects to a
    Redis that evicts). True: it serves and logs a warning."""
    registry_path: Path = DEFAULT_REGISTRY_PATH
    """Model registry file shared with the API."""
    models_dir: Path = PROJECT_ROOT / "var" / "models"
    """Directory of external weights ({models_dir} in the registry)."""
    trained_dir: Path = PROJECT_ROOT / "var" / "trained"
    """Directory of the models trained by this project ({trained_dir} in the registry)."""
    quickdraw_dir: Path = PROJECT_ROOT / "var" / "data" / "quickdraw"
    """QuickDraw ``<category>.npy`` files for training (missing ones are downloaded)."""
    calibration_dir: Path = PROJECT_ROOT / "var" / "data" / "calibration"
    """Photos that set the activation ranges of INT8 versions (``model.prepare``); about a dozen suffice."""
    calibration_samples: int = Field(default=300, ge=1)
    """Calibration inputs drawn from those photos (random crops and flips)."""
    training_cache_dir: Path = Path.home() / ".cache" / "image-portal" / "trained"
    """Trained models kept by a hash of their training options, trainer code and data, reused instead of retraining."""
    conversion_cache_dir: Path = Path.home() / ".cache" / "image-portal" / "openvino"
    """OpenVINO models converted from Keras files, kept by a hash of the file, the entry and the
    converter's version: a worker reads them instead of converting again (seconds at each start)."""
    allow_weight_download: bool = True
    """Let Keras download ImageNet weights when no local file is present."""
    weight_download_timeout_s: float = Field(default=60.0, gt=0)
    """How long a weights download may wait for the server's next bytes (connecting included)
    before it fails, saying so, rather than hanging the process that loads the model."""
    benchmark_mode: bool = False
    """Also serve benchmark-only models (random weights)."""
    model_workers: int = Field(default=1, ge=1)
    """Worker processes ``make run`` starts."""
    serve_models: str = ""
    """Model versions this worker loads and serves, e.g. "resnet50@1,sketch" (a bare name: every version); empty: all."""
    worker_id: str = ""
    """This worker's name in heartbeats and logs (default: host-pid)."""
    max_batch_size: int = Field(default=8, ge=1)
    """Most jobs of one model version run in one batched inference."""
    max_batch_delay_ms: float = Field(default=0.0, ge=0)
    """Longest wait for more jobs once a batch has started (0: take only those already waiting)."""
    visibility_timeout_ms: int = Field(default=30_000, ge=1)
    """A delivered job unacknowledged this long is taken over by another worker (the jobs of a
    stopped worker sooner: once its heartbeat is gone, after HEARTBEAT_TTL_S)."""
    max_deliveries: int = Field(default=3, ge=1)
    """Deliveries after which a job goes to the dead-letter stream as failed."""
    registry_check_s: float = Field(default=2.0, gt=0)
    """Besides listening for the API's announcements, how often the worker checks the registry's
    revision in Redis (a missed announcement delays a change by this much at most)."""
    heartbeat_interval_s: float = Field(default=2.0, gt=0)
    """How often the worker announces itself."""
    # Redis expires keys by the millisecond: a shorter TTL would be 0, which it refuses.
    heartbeat_ttl_s: float = Field(default=10.0, ge=0.001)
    """How long a heartbeat counts as live without renewal: longer than HEARTBEAT_INTERVAL_S, or
    the worker would look stopped between two and its jobs be taken over."""
    serving_stall_s: float = Field(default=120.0, gt=0)
    """How long the serving loop may go without coming round (one inference, a Redis retry)
    before the worker counts as hung: it then withholds its heartbeat, so peers take over its jobs
    once HEARTBEAT_TTL_S has passed, the API stops counting on it and ``model.health`` fails (a
    liveness probe restarts it). Far above the longest batch's inference. An explainer's loop
    follows the same rule (one Grad-CAM), building a twin aside."""
    inference_threads: int = Field(default=2, ge=1)
    """Threads one inference may use (TensorFlow intra-op, OpenVINO, TFLite): about the cores per worker."""
    tf_inter_op_threads: int = Field(default=1, ge=0)
    """TensorFlow threads running independent operations (0: TensorFlow's choice)."""
    batch_inference_cpus: int = Field(default=1, ge=0)
    """CPUs the batch lane's jobs are inferred on (0: all of the worker's). On a host of few
    cores, a batch inferred on all of them took the API's CPU from people's requests (p95 1.5-1.9
    times idle on a 2-core host, 1.3 with one CPU: ``test_people_stay_fast_while_a_large_batch_runs``);
    people's jobs still use every CPU."""
    people_anticipation_ms: float = Field(default=50.0, ge=0)
    """After answering a person's job, how long a batch job waits for that person's next one
    (anticipatory scheduling; 0: never waits). One person's requests in a row arrive a few
    milliseconds apart: a batch job inferred in that gap made the next request wait for it."""
    batch_max_defer_ms: float = Field(default=1000.0, ge=0)
    """Longest a batch job waits for people's jobs to pause: under a steady stream of them the
    batch still gets one job through this often."""
    cpu_nice: int = Field(default=10, ge=-20, le=19)
    """Niceness added to the worker process: inference yields the CPU to the API on a shared host."""
    labels_ttl_s: int = Field(default=7 * 86400, ge=1)
    """TTL of the published label lists in Redis."""
    explain_models: str = ""
    """Keras models an explainer (``python -m model.explainer``) loads to compute Grad-CAM heatmaps,
    e.g. "mobilenet_v2@1,sketch@3"; empty: the Keras twin of every version served."""
    explanation_ttl_s: int = Field(default=7 * 86400, ge=1)
    """How long a computed heatmap stays cached in Redis, per (user, image sha256, model version)."""
    # In whole milliseconds to XAUTOCLAIM: 0 would claim what another explainer is computing.
    explain_claim_idle_s: float = Field(default=10.0, ge=0.001)
    """An explanation request delivered to an explainer that has not acknowledged it for this long
    (it was killed, say) is claimed by another: answered if still awaited, else dropped."""
    log_level: str = "INFO"
    """Root log level."""
    log_json: bool = True
    """One JSON object per log line (false: plain text)."""

    def served_entries(self, registry: Registry) -> list[ModelEntry]:
        """The registry entries this worker serves; stops the process, saying why, when
        SERVE_MODELS names a version that is not served here (``ModelRefInvalid``)."""
        try:
            return registry.selected(self.serve_models, benchmark_mode=self.benchmark_mode)
        except ValueError as exc:
            raise ModelRefInvalid(f"SERVE_MODELS={self.serve_models!r}: {exc}") from None

    def live_entries(self, registry: Registry) -> list[ModelEntry]:
        """What SERVE_MODELS selects of a registry published while running: a name it names that is
        no longer served leaves nothing to serve for it, and the worker goes on."""
        wanted = [parse_model_ref(ref) for ref in self.serve_models.split(",") if ref.strip()]
        served = registry.served(benchmark_mode=self.benchmark_mode)
        if not wanted:
            return served
        return [m for m in served if any(m.name == n and v in (None, m.version) for n, v in wanted)]

    def published_entries(self, published: Registry, file: Registry) -> list[ModelEntry]:
        """What SERVE_MODELS selects, at start-up, of the registry the API published (``file``:
        the registry file, which seeds it). A model of either registry with no version served
        for now (all retired or disabled) selects nothing and the worker waits for one
        (``live_entries``); a reference that matches no model version of either, a mistake that
        no registry change will mend, stops the process, saying why (``ModelRefInvalid``)."""
        # Benchmark-only versions are none of this worker's unless BENCHMARK_MODE: no revision
        # changes that.
        known = [m for r in (published, file) for m in r.models if self.benchmark_mode or not m.benchmark_only]
        served = published.served(benchmark_mode=self.benchmark_mode)
        _check_refs("SERVE_MODELS", self.serve_models, known, f"served: {', '.join(m.key for m in served)}")
        return self.live_entries(published)

    def check_explain_models(self, *registries: Registry) -> None:
        """Raises ModelRefInvalid when EXPLAIN_MODELS holds a reference that is malformed or
        matches no model version of any of ``registries`` (the file's, the published one), in any
        state: an explainer told to explain only what does not exist would sit idle while looking
        healthy. A model whose versions are all retired for now is a valid reference."""
        known = [m for r in registries for m in r.models if self.benchmark_mode or not m.benchmark_only]
        listing = f"known: {', '.join(dict.fromkeys(m.key for m in known))}"
        _check_refs("EXPLAIN_MODELS", self.explain_models, known, listing)

    @model_validator(mode="after")
    def _heartbeat_outlives_its_interval(self) -> ModelSettings:
        if self.heartbeat_ttl_s <= self.heartbeat_interval_s:
            raise ValueError(
                f"HEARTBEAT_TTL_S ({self.heartbeat_ttl_s:g}) must be longer than HEARTBEAT_INTERVAL_S"
                f" ({self.heartbeat_interval_s:g}): the heartbeat would expire between two renewals"
            )
        if self.serving_stall_s <= self.heartbeat_interval_s:
            raise ValueError(
                f"SERVING_STALL_S ({self.serving_stall_s:g}) must be longer than HEARTBEAT_INTERVAL_S"
                f" ({self.heartbeat_interval_s:g}): a loop between two heartbeats would count as hung"
            )
        return self

    @field_validator(
        "registry_path",
        "models_dir",
        "trained_dir",
        "quickdraw_dir",
        "calibration_dir",
        "training_cache_dir",
        "conversion_cache_dir",
    )
    @classmethod
    def _expand_home(cls, value: Path) -> Path:
        return value.expanduser()

    def resolved_worker_id(self) -> str:
        return self.worker_id or f"{socket.gethostname()}-{os.getpid()}"


@lru_cache
def get_model_settings() -> ModelSettings:
    return ModelSettings()


SECRET_SETTINGS = frozenset({"redis_url"})
"""Settings whose values may hold credentials (a URL's password): a problem with one names its
variable, never the value."""


def settings_problems(exc: ValidationError) -> str:
    """``contracts.settings.settings_problems`` for the model side's settings: the values of
    ``SECRET_SETTINGS`` are never shown."""
    return contracts_settings.settings_problems(exc, secret=SECRET_SETTINGS)


def load_model_settings(process: str) -> ModelSettings:
    """The settings of an entry point (``process`` names it in the message): a value out of range
    stops it at once with one line naming the setting (SystemExit, status 1), not a traceback."""
    try:
        return ModelSettings()
    except ValidationError as exc:
        raise SystemExit(f"{process} refuses to start: {settings_problems(exc)}") from None
