"""API settings, read from the environment or ``.env``."""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from contracts import settings as contracts_settings
from contracts.imaging import DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_UPLOAD_BYTES
from contracts.registry import DEFAULT_REGISTRY_PATH
from contracts.settings import RedisUrl

PROJECT_ROOT = Path(__file__).resolve().parents[3]
DEV_ADMIN_PASSWORD = "admin"


class Settings(BaseSettings):
    """Everything the API process can be told."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", use_attribute_docstrings=True)

    environment: Literal["development", "test", "production"] = "development"
    """Deployment kind; anything but development refuses insecure defaults."""
    api_host: str = "127.0.0.1"
    """Interface the API binds to (0.0.0.0 to be reachable from other machines, as in containers)."""
    api_port: int = 8000
    """Port the API listens on."""
    api_workers: int = 1
    """Uvicorn worker processes for the API."""
    trusted_proxies: str = ""
    """Comma-separated addresses (or networks) of the reverse proxies whose X-Forwarded-For the API
    believes; from anyone else the header is ignored, so a client cannot pick the address its
    failed logins are counted under. Empty: no proxy is trusted."""
    api_graceful_shutdown_seconds: int = Field(default=5, ge=1)
    """On SIGTERM, how long the server waits for the requests in progress to finish (an upload, a
    prediction) before it cuts them off. Above the longest request worth finishing: a batch upload
    of MAX_BATCH_BYTES takes minutes on a slow link (deploy/k8s gives it 600 s)."""
    api_keep_alive_seconds: int = 75
    """How long an idle HTTP connection stays open. Longer than clients' and load balancers' own
    idle timeouts (60 s on common load balancers), so the server never closes a connection just as
    a client reuses it."""
    secret_key: str = ""
    """HMAC key that signs access tokens (HS256). Empty in development: a random key is made once
    and kept in SECRET_KEY_FILE, so every process of this machine shares it and no published
    default ever signs a token. Required outside development."""
    secret_key_file: Path = PROJECT_ROOT / "var" / "secret_key"
    """Where development keeps its generated SECRET_KEY (created with mode 0600)."""
    access_token_expire_minutes: int = 30
    """Lifetime of an access token; a login session ends after this long without a refresh."""
    session_max_hours: float = Field(default=12.0, gt=0)
    """A login session's absolute lifetime: however often it is refreshed, it ends this long after
    the password was given (OWASP's session management guide: an absolute timeout)."""
    database_url: str = "postgresql+asyncpg://postgres@127.0.0.1:5432/portal"
    """SQLAlchemy URL of the PostgreSQL database (asyncpg driver). A TLS mode (``disable`` ...
    ``verify-full``) goes in its query, as ``?sslmode=require`` or ``?ssl=require``: both work
    everywhere the URL is used (the engine, the start-up checks, the migrations). The CA and client
    certificate files of ``verify-ca``/``verify-full`` go in the environment (``PGSSLROOTCERT``,
    ``PGSSLCERT``, ``PGSSLKEY``), not the URL (refused there). A password with ``@ / # % :`` is
    percent-encoded."""
    db_pool_size: int = 20
    """Connections each API process opens at start-up and keeps."""
    db_max_overflow: int = 0
    """Extra connections per API process under load, each closed when returned (a reconnect per use)."""
    redis_url: RedisUrl = "redis://127.0.0.1:6379/0"
    """Redis URL; the database index in the path selects the logical database."""
    redis_max_connections: int = 512
    """Redis connections per API process for short commands, and as many again for requests' blocking
    waits (each waiting one-call prediction or explanation holds one; a one-call prediction that
    finds none free waits on until its deadline). The background loops have 4 of their own."""
    allow_redis_eviction: bool = False
    """Run on a Redis whose maxmemory-policy is not noeviction (managed Redis often ships
    allkeys-lru or volatile-lru), which deletes queued jobs and results under memory pressure. False:
    the API refuses to start there. True: it starts, logs a warning and shows it in /health/ready."""
    dependency_wait_attempts: int = 30
    """Start-up attempts to reach PostgreSQL and Redis before giving up."""
    dependency_wait_interval: float = 1.0
    """Seconds between those attempts."""
    first_admin_email: str = "admin@example.com"
    """Email of the admin created at start-up when missing."""
    first_admin_password: str = DEV_ADMIN_PASSWORD
    """Password of that admin; outside development it must meet the password policy."""
    allow_signup: bool = False
    """Whether anyone may create an account through POST /v1/auth/signup."""
    password_min_length: int = 8
    """Shortest password accepted through the API."""
    password_max_length: int = 128
    """Longest password accepted (bounds hashing work per request)."""
    argon2_memory_kib: int = 19456
    """Argon2id memory cost in KiB (OWASP minimum: 19 MiB)."""
    argon2_time_cost: int = 2
    """Argon2id iterations."""
    argon2_parallelism: int = 1
    """Argon2id lanes."""
    password_hash_threads: int = Field(default=1, ge=1)
    """Passwords hashed at once per API process; further logins wait, leaving CPU to other requests."""
    login_max_failures_per_email: int = 5
    """Failed logins for one email within the window before 429."""
    login_max_failures_per_client: int = 20
    """Failed logins from one client address within the window before 429."""
    login_window_seconds: int = 900
    """Window of the login throttling counters."""
    signup_max_per_client: int = 10
    """Sign-ups (accepted or refused) from one client address within the login window before 429."""
    storage_dir: Path = PROJECT_ROOT / "var" / "storage"
    """Directory of the content-addressed image store."""
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    """Largest accepted upload in bytes, and largest zip entry a batch unpacks (larger ones are skipped)."""
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    """Largest accepted image area (width x height); larger is treated as a decompression bomb."""
    max_concurrent_decodes: int = Field(default=2, ge=1)
    """Images decoded at once by each API process (uploads checked, views, thumbnails and
    explanation overlays drawn); more wait their turn. A 50-megapixel image takes a few hundred MB
    while it is decoded, so this bounds the memory decoding can take (and
    what a decode of 4 megapixels or more freed goes back to the system at once, not kept per thread)."""
    predict_deadline_seconds: float = 30.0
    """How long POST /model/predict waits for its result before answering 504."""
    job_deadline_seconds: float = 300.0
    """How long an asynchronous job may wait before it expires uncomputed."""
    max_queue_depth: int = 200
    """Pending jobs per model version beyond which new jobs get 503."""
    max_jobs_in_flight_per_user: int = 64
    """Unfinished jobs one user may have before 429."""
    result_cache_ttl_seconds: int = 86400
    """How long a (sha256, model, version) result is reused without inference."""
    job_key_ttl_seconds: int = 3600
    """TTL of per-job Redis keys (notifications, running markers)."""
    retry_after_seconds: int = 2
    """Retry-After sent with 503 answers."""
    result_claim_idle_seconds: float = 30.0
    """How long a worker's answer stays unacknowledged before a collector takes it over and tries again."""
    result_max_attempts: int = 3
    """Attempts to store an answer before it goes to the results:dead stream and its prediction fails."""
    registry_path: Path = DEFAULT_REGISTRY_PATH
    """Model registry file shared with the model service."""
    benchmark_mode: bool = False
    """Serve benchmark-only models (random weights); never in front of users."""
    wandb_api_key: str | None = None
    """Weights & Biases API key; when set, every inference is logged to W&B off the request path."""
    wandb_project: str = "image-portal"
    """W&B project of those runs."""
    wandb_mode: Literal["online", "offline"] = "online"
    """W&B mode; offline writes runs to WANDB_DIR for a later `wandb sync`."""
    wandb_dir: Path = PROJECT_ROOT / "var" / "wandb"
    """Where W&B keeps its run files."""
    log_level: str = "INFO"
    """Root log level."""
    log_json: bool = True
    """One JSON object per log line (false: plain text)."""
    outage_log_interval_seconds: float = 10.0
    """At most one log line per dependency outage per this many seconds."""
    expire_grace_seconds: float = 30.0
    """How long past its deadline an unanswered job waits for a worker's own verdict before the API expires it."""
    promotion_margin: float = Field(default=0.02, ge=0.0, le=1.0)
    """How much lower a candidate's accuracy (held-out, or on users' verdicts) may be than the stable
    version's before a promotion is refused (0.02: two points); an admin may force it with a reason."""
    shadow_sample_rate: float = Field(default=1.0, ge=0.0, le=1.0)
    """Share of a model's requests a shadow version of it gets a copy of (0.25: one in four)."""
    training_data_dir: Path = PROJECT_ROOT / "var" / "training"
    """Where each training run's labelled examples are exported for the trainer (a folder both the
    API and the trainer see: the same machine, or a shared volume)."""
    retrain_min_new_labels: int = Field(default=0, ge=0)
    """Start a training run of a model by itself once it has this many new labelled ``train``
    examples since its last run (0: never)."""
    retrain_epochs: int = Field(default=12, ge=1, le=200)
    """Epochs of a run the trigger starts."""
    retrain_check_seconds: float = Field(default=30.0, gt=0)
    """How often each API process fails runs whose trainer died, checks the trigger and applies
    the auto-promote rule."""
    auto_promote: bool = False
    """The auto-promote rule: a version a training run made is promoted to stable by itself once a
    worker serves it and its comparison with the stable version is not worse (PROMOTION_MARGIN);
    otherwise the run says why not. Off: an admin promotes."""
    auto_promote_wait_seconds: float = Field(default=3600.0, gt=0)
    """How long after its run the rule waits for a worker to serve a candidate (and for evidence
    to compare) before it leaves the decision to an admin."""
    feedback_test_share: float = Field(default=0.2, ge=0.0, le=1.0)
    """Share of labelled images held out as the feedback ``test`` split (by the image's hash, once)."""
    evaluation_max_images: int = Field(default=10_000, ge=1)
    """At most this many labelled images (the most recent verdicts) in one offline evaluation."""
    evaluation_in_flight: int = Field(default=32, ge=1)
    """Jobs of an offline evaluation queued at a time per version: the rest wait in PostgreSQL, so
    an evaluation of thousands of images never puts users' requests behind all of them."""
    evaluation_job_seconds: float = Field(default=300.0, gt=0)
    """Deadline of each evaluation job from the moment it is queued."""
    max_batch_images: int = Field(default=10_000, ge=1)
    """Most entries (images, and files skipped) one batch may hold; more is refused with 413."""
    max_batch_bytes: int = Field(default=2 * 1024**3, ge=1)
    """Largest batch, in bytes: the request's body, and the uncompressed size of the zip entries it
    unpacks (as their headers declare it; no entry is unpacked past its declared size)."""
    max_batch_images_queued_per_user: int = Field(default=20_000, ge=1)
    """Batch images one user may have waiting or in flight at once; a batch past it is refused (429)."""
    batch_in_flight: int = Field(default=1, ge=1)
    """Batch jobs in the queue at a time, over all batches: the rest wait in PostgreSQL, so a
    person's request waits behind at most this many of them."""
    batch_job_seconds: float = Field(default=600.0, gt=0)
    """Deadline of each batch job from the moment it is queued."""
    body_idle_timeout_seconds: float = Field(default=60.0, gt=0)
    """A request body from which nothing arrives for this long (a client gone quiet without
    closing its connection) is answered 408 and its connection closed: what it sent so far is
    dropped. The default is nginx's ``client_body_timeout``, the time it allows between two reads."""
    batch_receive_timeout_seconds: float = Field(default=30.0, gt=0)
    """A batch still ``receiving`` whose request has not noted for this long that it is alive (it
    notes it ten times per this period, however long a file takes) was left by a process that
    stopped: the lane cancels it, and the same request sent again with its Idempotency-Key makes a
    new batch at once instead of waiting for it."""
    export_batch_rows: int = Field(default=500, ge=1, le=100_000)
    """Examples an export job reads from PostgreSQL and writes per step (and per progress update)."""
    export_poll_seconds: float = Field(default=1.0, gt=0)
    """How often each API process looks for a queued export job (one small indexed query)."""
    export_lease_seconds: float = Field(default=30.0, gt=0)
    """An export job's lease: its process renews it every third of this; another process takes the
    job over (or fails it, after EXPORT_MAX_ATTEMPTS) once it has gone this long unrenewed."""
    export_max_attempts: int = Field(default=3, ge=1)
    """Processes that may take up one export job: past this, a job whose process died is failed."""
    export_keep_days: float = Field(default=7.0, gt=0)
    """Days a finished export's zip is kept for download; then it is deleted (the export stays
    listed, and its download answers 410)."""
    registry_refresh_seconds: float = 1.0
    """How often each API process checks the registry's revision in PostgreSQL (one small query) and
    republishes it to Redis if Redis lacks it: a change made through another process is served
    within this time."""
    reconcile_interval_seconds: float = 5.0
    """How often the API re-enqueues jobs lost with Redis and expires overdue ones."""
    revocation_cleanup_interval_seconds: float = 600.0
    """How often each API process deletes the revocations of tokens that expired over an hour ago."""
    stats_roll_up_seconds: float = Field(default=10.0, gt=0)
    """How often each API process folds the changes to the statistics' summaries into them (the
    statistics route also does it before it reads): the changes waiting stay few."""
    explanation_wait_seconds: float = Field(default=20.0, gt=0, le=120)
    """Longest a request for a heatmap waits for an explainer (then 504; the heatmap computed
    meanwhile is cached and the next request gets it at once)."""
    explanation_queue_limit: int = Field(default=50, ge=1)
    """Explanation requests waiting for one Keras model past which new ones are refused (503);
    requests past their deadline (a dead explainer's) are trimmed first and never count."""
    explanations_in_flight_per_user: int = Field(default=4, ge=1)
    """Explanation requests one user may have in the explainers' queues at once; beyond it 429
    with Retry-After, so one user cannot fill a queue for everyone."""
    drift_reference_size: int = Field(default=500, ge=10)
    """Drift: a version's first this many answered predictions are its reference window."""
    drift_window_size: int = Field(default=500, ge=10)
    """Drift: its latest this many answered predictions (after the reference) are compared with it."""
    drift_bins: int = Field(default=5, ge=2, le=50)
    """Bins of each numeric signal's distribution (quintiles of the reference by default), with
    one more below and one above the reference's range; with windows of n and m predictions, PSI
    has a floor of about (bins + 1)(1/n + 1/m) from sampling alone (Yurdakul 2018): 0.024 at the
    defaults, so a version answering as before reads "stable" (with 10 bins and windows of 200
    it was about 0.1, and nearly every version showed "watch" on one of its nine signals). A signal
    is compared only where reference and window each hold 20 of its values per bin (100 at 5
    bins; api.app.drift.service.MIN_VALUES_PER_BIN), else shown with why: windows smaller than
    that compare none."""
    drift_interval_seconds: float = Field(default=60.0, gt=0)
    """How often the drift indices are computed (by one API process at a time) and stored."""

    @field_validator("database_url")
    @classmethod
    def _database_url_parses(cls, value: str) -> str:
        # Read as the engine reads it, so that a URL it cannot take stops the process at start-up
        # naming the setting. The message never holds the URL: it may hold a password.
        try:
            url = make_url(value)
            url.port  # noqa: B018 - parsed lazily by some SQLAlchemy versions
        except (ArgumentError, ValueError):
            raise ValueError(
                "not a database URL SQLAlchemy can read (postgresql+asyncpg://user:password@host:port/database;"
                " a password with @ / # % : is percent-encoded)"
            ) from None
        if url.get_backend_name() != "postgresql":
            raise ValueError(
                f"a {url.get_backend_name()} URL; the portal runs on PostgreSQL (postgresql+asyncpg://...)"
            )
        return value

    @model_validator(mode="after")
    def _refuse_insecure_defaults(self) -> Settings:
        if self.environment == "development":
            if not self.secret_key:
                self.secret_key = generated_secret(self.secret_key_file)
            return self
        if len(self.secret_key) < 32:
            raise ValueError(
                "SECRET_KEY must be set to a random value of at least 32 characters "
                f"outside development (ENVIRONMENT={self.environment})"
            )
        pw = self.first_admin_password
        if pw == DEV_ADMIN_PASSWORD or not (self.password_min_length <= len(pw) <= self.password_max_length):
            raise ValueError(
                "FIRST_ADMIN_PASSWORD must meet the password policy "
                f"({self.password_min_length}-{self.password_max_length} characters) "
                "and not be the development default outside development"
            )
        return self


def generated_secret(path: Path) -> str:
    """The key kept in ``path``, made (48 random bytes, URL-safe base64) when missing. The first
    process to link its key in place wins; the others read that one."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".secret-")
        try:
            os.write(fd, secrets.token_urlsafe(48).encode())
            os.close(fd)
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            os.unlink(tmp)
    return path.read_text().strip()


@lru_cache
def get_settings() -> Settings:
    return Settings()


SECRET_SETTINGS = frozenset({"secret_key", "first_admin_password", "database_url", "redis_url", "wandb_api_key"})
"""Settings whose values are credentials or may hold them (a URL's password): a problem with one
names its variable, never the value."""


def settings_problems(exc: ValidationError) -> str:
    """``contracts.settings.settings_problems`` for the API's settings: the values of
    ``SECRET_SETTINGS`` are never shown."""
    return contracts_settings.settings_problems(exc, secret=SECRET_SETTINGS)


def load_settings(process: str) -> Settings:
    """The settings (``get_settings``) of an entry point, ``process`` naming it: a value that
    cannot be used stops it at once with one line on stderr naming the setting (SystemExit,
    status 1), not a traceback."""
    try:
        return get_settings()
    except ValidationError as exc:
        raise SystemExit(f"{process} refuses to start: {settings_problems(exc)}") from None
