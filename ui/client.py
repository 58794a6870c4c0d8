"""The UI's only way to the portal: the HTTP API, with every error turned into a short message.

Every answer is checked against the shape below (pydantic, on the API's JSON) and handed over as
plain dicts, so pages read ``job["status"]`` as a :class:`PredictionStatus` and Streamlit can keep
answers in its session state. Times stay the ISO 8601 strings the API sends.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any, Literal, NotRequired, TypeVar

import httpx
from pydantic import Base64Bytes, TypeAdapter, ValidationError

# pydantic reads TypedDicts only from typing_extensions before Python 3.12.
from typing_extensions import TypedDict

from contracts.api_keys import Scope
from contracts.messages import PredictionStatus

MESSAGES = {
    401: "Your session has expired or was revoked. Please log in again.",
    403: "You are not allowed to do that.",
    404: "That item no longer exists.",
    409: "That change conflicts with the current state.",
    413: "That file is too large.",
    415: "That file is not an image the portal can read.",
    422: "The request was not valid.",
    429: "Too many attempts.",
    503: "The portal is busy or part of it is down. Please try again shortly.",
    504: "The models took too long to answer. Please try again.",
}

STILL_QUEUED = (
    "The models have not answered within {waited:g} seconds (a model worker may be busy or down). Your "
    "picture stays queued: its answers appear in History once a worker takes it, so there is no need to "
    "send it again."
)
"""Said when ``Api.wait`` gives up (``waited``: its timeout): the job goes on at the portal."""
FEEDBACK_GONE = (
    "This result is gone: its picture was deleted (in another tab or window, say), and its answers with it, "
    "so the verdict was not kept."
)

EXPLANATION_MESSAGES = {
    410: "The picture of this prediction is no longer stored, so it cannot be explained.",
    502: "The heatmap could not be drawn: the explainer failed on this picture (a fault of the portal's, "
    "logged for its operators). Try again later.",
    503: "No explainer can draw this heatmap right now: none is running for this model, or it is still "
    "loading it. Try again in a moment.",
    504: "The heatmap was not ready in time. Try again in a moment: once drawn, it is shown at once.",
}
"""What the explanation's failures mean to a person (the generic messages speak of the models)."""

Role = Literal["user", "admin"]
BATCH_TIMEOUT = 900.0
"""Seconds the UI waits for the API to take a batch in."""


class User(TypedDict):
    id: int
    email: str
    name: str
    role: Role
    is_active: bool
    created_at: str


class Session(TypedDict):
    token: str
    expires_in: int
    """Seconds the token stays valid."""


class InputSpec(TypedDict):
    height: int
    width: int
    mode: Literal["RGB", "L"]


class Model(TypedDict):
    """A model version of the catalog, and whether a worker serves it now."""

    name: str
    version: int
    ref: str
    display_name: str
    channel: str
    description: str
    runtime: str
    precision: str
    input: InputSpec
    num_classes: int
    labels: list[str] | None
    available: bool
    reason: str | None
    workers: int
    random_weights: bool
    default: bool
    explainable: bool


class VersionLabels(TypedDict):
    """Any version a prediction can come from, retired ones included: its name and labels."""

    ref: str
    display_name: str | None
    labels: list[str]


class Image(TypedDict):
    id: str
    sha256: str
    format: str
    width: int
    height: int
    bytes: int
    filename: str
    file_name: str
    ground_truth: str | None
    source: Literal["upload", "batch"]
    created_at: str


class ListedImage(Image):
    thumbnail: Base64Bytes | None
    """JPEG, at most 280 px a side; None unless asked for, or when the blob is lost."""


class ImagesPage(TypedDict):
    data: list[ListedImage]
    count: int | None
    next_cursor: str | None


class LabelScore(TypedDict):
    label: str
    score: float


class Timings(TypedDict):
    """Where a prediction's time went, in milliseconds; None when answered from the cache."""

    queue_ms: float | None
    preprocess_ms: float | None
    inference_ms: float | None
    total_ms: float | None
    batch_size: int | None


class Prediction(TypedDict):
    """One model version's answer within a job."""

    id: str
    model: str
    version: int
    status: PredictionStatus
    label: str | None
    score: float | None
    top_k: list[LabelScore]
    cached: bool
    random_weights: bool
    error: str | None
    timings: Timings


class Job(TypedDict):
    job_id: str
    image_id: str
    status: PredictionStatus
    created_at: str
    finished_at: str | None
    results: list[Prediction]


class JobsPage(TypedDict):
    data: list[Job]
    count: int | None
    next_cursor: str | None


class Feedback(TypedDict):
    id: str
    owner_id: int
    prediction_id: str | None
    is_correct: bool | None
    correct_label: str | None
    comment: str | None
    predicted_class: str | None
    score: float | None
    image_file_name: str | None
    created_at: str
    model: NotRequired[str | None]


class BatchCounts(TypedDict):
    images: int
    queued: int
    running: int
    done: int
    failed: int
    cancelled: int
    skipped: int
    deleted: int
    partly_answered: int
    eta_seconds: int | None


class Batch(TypedDict):
    id: str
    status: str
    models: list[str]
    entries: int
    created_at: str
    finished_at: str | None


class BatchDetail(Batch):
    counts: BatchCounts
    waiting_for: list[str]


class BatchResult(TypedDict):
    """One file's answer by one model version, or a skipped file (``status`` "skipped", ``model``
    empty) with why in ``error``."""

    file_name: str
    sha256: str
    model: str
    version: int | None
    status: str
    label: str | None
    score: float | None
    top_5: list[dict[str, object]]
    error: str | None


class BatchResults(TypedDict):
    """A page of a batch's results, in the batch's order."""

    batch_id: str
    status: str
    data: list[BatchResult]
    count: int
    """Rows on every page (of the status asked for)."""
    next_cursor: str | None


class SentBatch(TypedDict):
    """A batch as ``Api.create_batch`` sent it."""

    batch: BatchDetail
    replayed: bool
    """Made by an earlier send of the same files (the same Idempotency-Key), not by this one."""


class BatchesPage(TypedDict):
    data: list[Batch]
    count: int


class DailyCount(TypedDict):
    day: str
    model: str
    version: int
    predictions: int
    by_status: dict[str, int]


class LatencyPercentiles(TypedDict):
    model: str
    version: int
    count: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None


class Accuracy(TypedDict):
    model: str
    version: int
    feedback: int
    correct: int
    accuracy: float | None


class Correction(TypedDict):
    model: str
    version: int
    predicted: str | None
    corrected_to: str | None
    count: int


class Stats(TypedDict):
    """The admin dashboard's numbers; ``queue_depth`` maps a model stream to its waiting jobs."""

    predictions_per_day: list[DailyCount]
    latency: list[LatencyPercentiles]
    accuracy: list[Accuracy]
    most_corrected: list[Correction]
    queue_depth: dict[str, int]
    live_workers: int


class Export(TypedDict):
    """An export job of the images users labelled: ``queued``, ``running``, then ``done``,
    ``failed`` or ``cancelled``; ``download`` is set once done."""

    id: str
    kind: str
    model: str | None
    version: int | None
    since_last: bool
    status: str
    since: str | None
    until: str | None
    rows_total: int
    rows_done: int
    bytes_written: int
    summary: dict[str, Any] | None
    error: str | None
    requested_by: str
    attempts: int
    created_at: str
    started_at: str | None
    finished_at: str | None
    heartbeat_at: str | None
    download: str | None


class ServingVersion(TypedDict):
    """A model version as the Models tab shows it."""

    name: str
    version: int
    display_name: str
    channel: str
    enabled: bool
    weight: int
    weight_share: float
    workers: int
    memory_mib: float | None
    unavailable_reason: str | None
    heldout_accuracy: float | None
    feedback: int
    feedback_accuracy: float | None


class VersionStats(TypedDict):
    version: int
    channel: str
    heldout_accuracy: float | None
    feedback: int
    feedback_accuracy: float | None
    answers: int
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    mean_score: float | None


class EvaluatedVersion(TypedDict):
    version: int
    answered: int
    failed: int
    pending: int
    correct: int
    accuracy: float | None


class Evaluation(TypedDict):
    id: str
    model: str
    status: str
    images: int
    requested_by: str
    created_at: str
    finished_at: str | None
    candidate: EvaluatedVersion
    baseline: EvaluatedVersion


class Comparison(TypedDict):
    model: str
    candidate: VersionStats
    baseline: VersionStats
    days: int
    shadow_answers: int
    shadow_agreement: float | None
    evaluation: Evaluation | None
    margin: float
    verdict: str
    reasons: list[str]


class TrainingRun(TypedDict):
    id: str
    model_name: str
    version: int
    base_version: int
    status: str
    trigger: str
    requested_by: str
    reason: str
    options: dict[str, Any]
    categories: list[str]
    examples: dict[str, int]
    trainer: str | None
    history: list[dict[str, float | None]]
    record: dict[str, Any] | None
    error: str | None
    created_at: str
    started_at: str | None
    finished_at: str | None
    cancel_requested_at: str | None
    epoch: int
    """Epochs finished."""
    step: int | None
    """Steps done in the epoch after those finished, as last reported; None before its first report."""
    steps: int | None
    """Steps in an epoch, with ``step``."""
    eta_seconds: float | None
    promotion: str | None


class TrainingRecord(TypedDict):
    """How a version was trained: ``record`` is its metrics.json; ``run`` the run that trained it,
    None for a version trained before runs existed (``source`` "metrics.json")."""

    model_name: str
    version: int
    source: str
    run: TrainingRun | None
    record: dict[str, Any]


class Readiness(TypedDict):
    """``status`` is "ok" or "fail"; ``checks`` maps postgresql, redis and workers to their result;
    ``warnings`` names what runs but hurts (autovacuum off, a Redis that may evict keys)."""

    status: str
    checks: dict[str, dict[str, Any]]
    warnings: list[str]


class ApiKey(TypedDict):
    """An API key as its owner sees it in lists: never the key itself."""

    id: str
    name: str
    prefix: str
    """The key's first characters, to tell keys apart."""
    scopes: list[Scope]
    created_at: str
    expires_at: str | None
    last_used_at: str | None
    """To the minute; None until the key is first used."""
    revoked_at: str | None


class NewApiKey(ApiKey):
    key: str
    """The key itself, in this answer only."""


class ApiKeysPage(TypedDict):
    data: list[ApiKey]
    count: int


T = TypeVar("T")

_USER = TypeAdapter(User)
_USERS = TypeAdapter(list[User])
_MODELS = TypeAdapter(list[Model])
_VERSION_LABELS = TypeAdapter(VersionLabels)
_IMAGE = TypeAdapter(Image)
_IMAGES = TypeAdapter(ImagesPage)
_JOB = TypeAdapter(Job)
_JOBS = TypeAdapter(JobsPage)
_SESSION = TypeAdapter(Session)
_BATCH = TypeAdapter(BatchDetail)
_BATCHES = TypeAdapter(BatchesPage)
_BATCH_RESULTS = TypeAdapter(BatchResults)
_FEEDBACK = TypeAdapter(Feedback)
_FEEDBACKS = TypeAdapter(list[Feedback])
_STATS = TypeAdapter(Stats)
_READINESS = TypeAdapter(Readiness)
_SERVING = TypeAdapter(list[ServingVersion])
_COMPARISON = TypeAdapter(Comparison)
_EVALUATION = TypeAdapter(Evaluation)
_EVALUATIONS = TypeAdapter(list[Evaluation])
_EXPORT = TypeAdapter(Export)
_EXPORTS = TypeAdapter(list[Export])
_RUN = TypeAdapter(TrainingRun)
_RUNS = TypeAdapter(list[TrainingRun])
_RECORD = TypeAdapter(TrainingRecord)
_API_KEYS = TypeAdapter(ApiKeysPage)
_NEW_API_KEY = TypeAdapter(NewApiKey)


class ApiError(Exception):
    """A failed API call with a message fit to show a person."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


AGAIN_LATER = re.compile(r"\b(try again|retry) (?:later|shortly)\b", re.IGNORECASE)
"""How the API's reasons (and ``MESSAGES``) ask to come back, without saying when."""


def _message(response: httpx.Response) -> str:
    base = MESSAGES.get(response.status_code, f"Unexpected answer from the portal ({response.status_code}).")
    try:
        detail = response.json().get("detail")
    except ValueError:
        detail = None
    if isinstance(detail, list):  # FastAPI validation errors, each named by its field
        detail = "; ".join(_validation_error(d) for d in detail)
    # A 403's detail says which right is missing (a deactivated account, admins only, a key's
    # scope); a 429's or 503's what is busy or down (a model no worker serves yet, a full queue).
    if response.status_code in (403, 409, 413, 415, 422, 429, 503) and detail:
        base = str(detail).strip()
    elif response.status_code == 401 and isinstance(detail, str) and "deactivated" in detail:
        # Not an expired session: logging in again will not help.
        base = detail.strip() + ("" if detail.strip().endswith(".") else ".")
    retry = response.headers.get("retry-after")
    if retry and retry.isdigit() and response.status_code in (429, 503):
        wait = _wait(int(retry))
        # The reason's own "try again later" says when, instead of a second "try again" after it.
        timed, found = AGAIN_LATER.subn(lambda again: f"{again.group(1)} in {wait}", base, count=1)
        if not found:
            timed = base + ("" if base.endswith((".", "!", "?")) else ".") + f" Try again in {wait}"
        base = timed if timed.endswith((".", "!", "?")) else timed + "."
    return base


def _validation_error(error: object) -> str:
    """One of FastAPI's validation errors as a person reads it: ``full_name: String should have
    at most 200 characters`` (the field is the last name in its ``loc``)."""
    if not isinstance(error, dict):
        return str(error)
    message = str(error.get("msg", error))
    names = [part for part in error.get("loc") or [] if isinstance(part, str) and part not in ("body", "query", "path")]
    return f"{names[-1].replace('_', ' ')}: {message}" if names else message


def _wait(seconds: int) -> str:
    """A Retry-After in words: "5 seconds", "15 minutes" (rounded up), "2 hours"."""
    if seconds < 90:
        return f"{seconds} second{'s' if seconds != 1 else ''}"
    if seconds < 90 * 60:
        return f"{-(-seconds // 60)} minutes"
    return f"{-(-seconds // 3600)} hours"


def _detail(response: httpx.Response) -> str | None:
    """The API's own reason for an error (its ``detail`` text), if it gave one."""
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        return None
    return detail if isinstance(detail, str) and detail else None


def _typed(adapter: TypeAdapter[T], body: Any) -> T:
    """``body`` checked against ``adapter``'s type; ApiError when the API answered another shape."""
    try:
        return adapter.validate_python(body)
    except ValidationError as exc:
        raise ApiError(0, f"Unexpected answer from the portal ({exc.error_count()} fields differ).") from None


class Api:
    """The portal's HTTP API as one user (``token``) sees it; every method raises :class:`ApiError`."""

    def __init__(
        self, base_url: str, token: str | None = None, timeout: float = 40.0, client_address: str | None = None
    ) -> None:
        """``client_address``: the browser's address, sent as ``X-Forwarded-For`` so that the API
        throttles each person on their own (it counts the header only when this process's address
        is in the API's ``TRUSTED_PROXIES``); None for a local browser or a script."""
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.client_address = client_address

    def _request(
        self,
        method: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        expected: tuple[int, ...] = (),
        **kwargs: Any,
    ) -> httpx.Response:
        """The answer; raises ApiError for an error status other than ``expected`` ones."""
        sent = {**(headers or {}), **({"Authorization": f"Bearer {self.token}"} if self.token else {})}
        if self.client_address:
            sent["X-Forwarded-For"] = self.client_address
        try:
            kwargs.setdefault("timeout", self.timeout)
            response = httpx.request(method, self.base_url + path, headers=sent, **kwargs)
        except httpx.RemoteProtocolError:
            # Reached, but its answer ended early (a streamed CSV whose database went away).
            raise ApiError(0, "The portal API's answer was cut off before its end; try again in a moment.") from None
        except httpx.HTTPError:
            raise ApiError(0, f"Cannot reach the portal API at {self.base_url}. Is it running?") from None
        if response.status_code >= 400 and response.status_code not in expected:
            raise ApiError(response.status_code, _message(response))
        return response

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._request(method, path, **kwargs)
        return response.json() if response.content else None

    def login(self, email: str, password: str) -> Session:
        """Logs in and keeps the access token for the next calls; returns it with its lifetime."""
        return self._session(self.json("POST", "/v1/auth/login", data={"username": email, "password": password}))

    def refresh(self) -> Session:
        """A new token in the same login session, valid for its full lifetime from now (kept for the
        next calls); ApiError 401 when the session expired, was revoked or its user deactivated."""
        return self._session(self.json("POST", "/v1/auth/refresh"))

    def _session(self, body: Any) -> Session:
        session = _typed(_SESSION, {"token": body["access_token"], "expires_in": body["expires_in"]})
        self.token = session["token"]
        return session

    def logout(self) -> None:
        self._request("POST", "/v1/auth/logout")

    def me(self) -> User:
        return _typed(_USER, self.json("GET", "/v1/users/me"))

    def models(self) -> list[Model]:
        return _typed(_MODELS, self.json("GET", "/v1/models")["data"])

    def version_labels(self, ref: str) -> VersionLabels:
        """The display name and labels of any version a prediction can come from, retired ones
        included (``GET /v1/models/{ref}/labels``)."""
        return _typed(_VERSION_LABELS, self.json("GET", f"/v1/models/{ref}/labels"))

    def upload(self, name: str, data: bytes) -> Image:
        return _typed(_IMAGE, self.json("POST", "/v1/images", files={"file": (name, data)}))

    def predict(self, image_id: str, models: list[str]) -> str:
        """Queues a prediction of the image by the model references; returns the job id."""
        body = self.json("POST", "/v1/predictions", json={"image_id": image_id, "models": models})
        job_id: str = body["job_id"]
        return job_id

    def job(self, job_id: str) -> Job:
        return _typed(_JOB, self.json("GET", f"/v1/predictions/{job_id}"))

    def wait(self, job_id: str, timeout: float = 60.0, on_poll: Callable[[Job], None] | None = None) -> Job:
        """The job once every model answered (polled every 0.2 s); ApiError 504 (``STILL_QUEUED``)
        after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job["status"].terminal:
                return job
            if time.monotonic() > deadline:
                raise ApiError(504, STILL_QUEUED.format(waited=timeout))
            if on_poll is not None:
                on_poll(job)
            time.sleep(0.2)

    def images(
        self,
        cursor: str | None = None,
        limit: int = 12,
        thumbnails: bool = False,
        total: bool = False,
        source: Literal["upload", "batch"] | None = None,
    ) -> ImagesPage:
        """A page of my images, newest first (after ``cursor``, a page's ``next_cursor``), with
        each one's thumbnail and the count of all of them when asked; ``source="upload"``: only
        those uploaded on their own, not the files of my batches."""
        params: dict[str, str | int | bool] = {"limit": limit, "thumbnails": thumbnails, "total": total}
        if cursor is not None:
            params["cursor"] = cursor
        if source is not None:
            params["source"] = source
        return _typed(_IMAGES, self.json("GET", "/v1/images", params=params))

    def jobs_of_images(self, image_ids: list[str], page_size: int = 200) -> list[Job]:
        """Every job of these images of mine (at most 200 images), newest first, fetched
        ``page_size`` at a time."""
        jobs: list[Job] = []
        cursor: str | None = None
        while True:
            params: dict[str, object] = {"image_id": image_ids, "limit": page_size}
            if cursor is not None:
                params["cursor"] = cursor
            page = _typed(_JOBS, self.json("GET", "/v1/predictions", params=params))
            jobs += page["data"]
            cursor = page["next_cursor"]
            if cursor is None:
                return jobs

    def create_batch(
        self, files: list[tuple[str, bytes]], models: list[str], idempotency_key: str | None = None
    ) -> SentBatch:
        """Starts a batch of these (name, bytes) files (images or zips) for the model references.

        With ``idempotency_key``, sending the same files again gets the batch the first send made
        (``replayed``), also while the portal is still receiving it."""
        parts = [("file", (name, data)) for name, data in files]
        # Every image is checked and stored before the answer: a large collection takes minutes.
        response = self._request(
            "POST",
            "/v1/batches",
            files=parts,
            data={"models": ",".join(models)},
            headers={"Idempotency-Key": idempotency_key} if idempotency_key else None,
            expected=(409,),
            timeout=BATCH_TIMEOUT,
        )
        if response.status_code == 409:
            location = response.headers.get("location", "")
            if not location.startswith("/v1/batches/"):
                raise ApiError(409, _message(response))
            return {"batch": self.batch(location.rsplit("/", 1)[1]), "replayed": True}
        replayed = response.headers.get("idempotent-replayed") == "true"
        return {"batch": _typed(_BATCH, response.json()), "replayed": replayed}

    def batch(self, batch_id: str) -> BatchDetail:
        return _typed(_BATCH, self.json("GET", f"/v1/batches/{batch_id}"))

    def batches(self, limit: int = 20) -> BatchesPage:
        """My latest batches, newest first."""
        return _typed(_BATCHES, self.json("GET", "/v1/batches", params={"limit": limit}))

    def batch_results(
        self, batch_id: str, status: str | None = None, limit: int = 100, cursor: str | None = None
    ) -> BatchResults:
        """A page of the batch's answers so far (``limit`` rows, at most 200, after ``cursor``, a
        page's ``next_cursor``), one per file and model, skipped files with why; only those in
        ``status`` when given ("skipped": the skipped files). ``count`` tells how many in all."""
        params: dict[str, str | int] = {"limit": limit}
        if status is not None:
            params["status"] = status
        if cursor is not None:
            params["cursor"] = cursor
        return _typed(_BATCH_RESULTS, self.json("GET", f"/v1/batches/{batch_id}/results", params=params))

    def batch_csv(self, batch_id: str) -> bytes:
        return self._request("GET", f"/v1/batches/{batch_id}/results", params={"format": "csv"}).content

    def cancel_batch(self, batch_id: str) -> BatchDetail:
        return _typed(_BATCH, self.json("DELETE", f"/v1/batches/{batch_id}"))

    def delete_image(self, image_id: str) -> bool:
        self._request("DELETE", f"/v1/images/{image_id}")
        return True

    def feedback(
        self, prediction_id: str, is_correct: bool, correct_label: str | None, comment: str | None
    ) -> Feedback:
        payload = {
            "prediction_id": prediction_id,
            "is_correct": is_correct,
            "correct_label": correct_label,
            "comment": comment,
        }
        try:
            return _typed(_FEEDBACK, self.json("POST", "/v1/feedback", json=payload))
        except ApiError as exc:
            if exc.status == 404:  # "That item no longer exists" would not say which, nor what became of the verdict
                raise ApiError(404, FEEDBACK_GONE) from None
            raise

    def my_feedback(self, prediction_ids: list[str] | None = None) -> list[Feedback]:
        """My latest verdicts (500 at most), or those on these predictions (500 at most)."""
        params: dict[str, object] = {"limit": 500}
        if prediction_ids is not None:
            params["prediction_id"] = prediction_ids
        return _typed(_FEEDBACKS, self.json("GET", "/v1/feedback", params=params)["data"])

    def all_feedback(self, limit: int = 200) -> list[Feedback]:
        """Everyone's latest verdicts, newest first (admins)."""
        params = {"all_users": True, "limit": limit}
        return _typed(_FEEDBACKS, self.json("GET", "/v1/feedback", params=params)["data"])

    def users(self) -> list[User]:
        return _typed(_USERS, self.json("GET", "/v1/users", params={"limit": 500})["data"])

    def create_user(self, email: str, password: str, name: str, role: Role) -> User:
        payload = {"email": email, "password": password, "name": name, "role": role}
        return _typed(_USER, self.json("POST", "/v1/users", json=payload))

    def update_user(self, user_id: int, *, role: Role | None = None, is_active: bool | None = None) -> User:
        """Changes the given fields of a user (admins); the others stay."""
        changes = {k: v for k, v in {"role": role, "is_active": is_active}.items() if v is not None}
        return _typed(_USER, self.json("PATCH", f"/v1/users/{user_id}", json=changes))

    # --- API keys (with a login token only) ----------------------------------------------------

    def api_keys(self) -> list[ApiKey]:
        """My API keys, newest first (at most 200), revoked and expired ones too."""
        return _typed(_API_KEYS, self.json("GET", "/v1/api-keys", params={"limit": 200}))["data"]

    def create_api_key(self, name: str, scopes: list[Scope], expires_in_days: int | None) -> NewApiKey:
        """A new key with these scopes, expiring after ``expires_in_days`` days (None: never); the
        answer is the only one that carries the key. ApiError 403 for the admin scope of a non-admin."""
        body = {"name": name, "scopes": [str(s) for s in scopes], "expires_in_days": expires_in_days}
        return _typed(_NEW_API_KEY, self.json("POST", "/v1/api-keys", json=body))

    def revoke_api_key(self, key_id: str) -> bool:
        """Revokes one of my keys; ApiError 404 when it is not mine."""
        self._request("DELETE", f"/v1/api-keys/{key_id}")
        return True

    def stats(self) -> Stats:
        return _typed(_STATS, self.json("GET", "/v1/admin/stats"))

    def explanation_png(self, prediction_id: str) -> bytes:
        """My image with the Grad-CAM heatmap of one prediction's top-1 class over it (PNG). Raises
        ApiError; 410, 503 and 504 say what they mean for a heatmap (``EXPLANATION_MESSAGES``)."""
        path = f"/v1/predictions/{prediction_id}/explanation"
        try:
            return self._request("GET", path, params={"format": "png"}, timeout=max(self.timeout, 25.0)).content
        except ApiError as exc:
            if exc.status in EXPLANATION_MESSAGES:
                raise ApiError(exc.status, EXPLANATION_MESSAGES[exc.status]) from None
            raise

    def drift(self) -> dict[str, Any]:
        """The latest drift indices per model version (admins): GET /v1/admin/drift."""
        return dict(self.json("GET", "/v1/admin/drift"))

    def feedback_export(self, model: str | None = None) -> bytes:
        """A zip of the images users labelled (admins): ``<model>/<label>/<image>`` and feedback.csv."""
        params = {"model": model} if model else {}
        return self._request("GET", "/v1/admin/feedback-export", params=params).content

    def start_export(self, model: str | None = None, *, since_last: bool = False) -> Export:
        """Queues an export job of what users labelled (admins): of one model, or every model when
        None; with ``since_last``, only verdicts given since the last export of the same model."""
        body = {"kind": "feedback", "model": model, "since_last": since_last}
        return _typed(_EXPORT, self.json("POST", "/v1/admin/exports", json=body))

    def exports(self, limit: int = 20) -> list[Export]:
        """The latest export jobs, newest first (admins)."""
        return _typed(_EXPORTS, self.json("GET", "/v1/admin/exports", params={"limit": limit})["data"])

    def export(self, export_id: str) -> Export:
        return _typed(_EXPORT, self.json("GET", f"/v1/admin/exports/{export_id}"))

    def cancel_export(self, export_id: str) -> Export:
        """Cancels a queued or running export; ApiError 409 for one that is done or failed."""
        return _typed(_EXPORT, self.json("POST", f"/v1/admin/exports/{export_id}/cancel"))

    def download_export(self, export_id: str) -> tuple[str, bytes]:
        """The zip of a finished export and its file name; ApiError 409 while it is not done."""
        response = self._request("GET", f"/v1/admin/exports/{export_id}/download")
        found = re.search(r'filename="([^"]+)"', response.headers.get("content-disposition", ""))
        return (found.group(1) if found else f"export-{export_id}.zip"), response.content

    # --- the model registry (admins) ---------------------------------------------------------

    def serving(self) -> list[ServingVersion]:
        """Every registered version with its state, workers, memory and accuracies."""
        return _typed(_SERVING, self.json("GET", "/v1/admin/registry/serving")["versions"])

    def compare(self, name: str, candidate: int, baseline: int | None = None) -> Comparison:
        params: dict[str, int] = {"candidate": candidate}
        if baseline is not None:
            params["baseline"] = baseline
        return _typed(_COMPARISON, self.json("GET", f"/v1/admin/registry/models/{name}/compare", params=params))

    def set_weights(self, name: str, weights: dict[int, int], reason: str, force: bool = False) -> None:
        body = {"weights": {str(v): w for v, w in weights.items()}, "reason": reason, "force": force}
        self.json("PUT", f"/v1/admin/registry/models/{name}/weights", json=body)

    def set_channel(
        self, name: str, version: int, reason: str, *, channel: str | None = None, enabled: bool | None = None
    ) -> None:
        """Puts a version in shadow, back to canary or retires it; enables or disables it."""
        body: dict[str, Any] = {"reason": reason}
        if channel is not None:
            body["channel"] = channel
        if enabled is not None:
            body["enabled"] = enabled
        self.json("PATCH", f"/v1/admin/registry/models/{name}/versions/{version}", json=body)

    def promote(self, name: str, version: int, reason: str, force: bool = False) -> None:
        body = {"reason": reason, "force": force}
        self.json("POST", f"/v1/admin/registry/models/{name}/versions/{version}/promote", json=body)

    def rollback(self, name: str, reason: str, from_version: int | None = None) -> None:
        """Undoes the latest promotion of ``name``; with ``from_version``, only while that version
        is the stable one (ApiError 409 otherwise: someone rolled back or promoted meanwhile)."""
        body: dict[str, Any] = {"reason": reason, "from_version": from_version}
        self.json("POST", f"/v1/admin/registry/models/{name}/rollback", json=body)

    def evaluate(self, name: str, candidate: int, baseline: int | None = None) -> Evaluation:
        """Starts running both versions on the images users labelled."""
        body: dict[str, Any] = {"candidate": candidate, "baseline": baseline}
        return _typed(_EVALUATION, self.json("POST", f"/v1/admin/registry/models/{name}/evaluations", json=body))

    def evaluations(self, name: str) -> list[Evaluation]:
        return _typed(_EVALUATIONS, self.json("GET", f"/v1/admin/registry/models/{name}/evaluations"))

    # --- training runs (admins) -------------------------------------------------------------

    def training_runs(self, model: str | None = None) -> list[TrainingRun]:
        params = {"model": model} if model else {}
        return _typed(_RUNS, self.json("GET", "/v1/admin/training-runs", params=params)["data"])

    def start_training(self, model: str, options: dict[str, Any], reason: str) -> TrainingRun:
        body = {"model": model, "options": options, "reason": reason}
        return _typed(_RUN, self.json("POST", "/v1/admin/training-runs", json=body))

    def cancel_training(self, run_id: str) -> TrainingRun:
        return _typed(_RUN, self.json("POST", f"/v1/admin/training-runs/{run_id}/cancel"))

    def training_record(self, name: str, version: int) -> TrainingRecord:
        """Raises ApiError 404 for a version without a record, with the API's reason as its message
        (not trained by the portal, its run unfinished, no metrics.json published)."""
        path = f"/v1/admin/registry/models/{name}/versions/{version}/training"
        response = self._request("GET", path, expected=(404,))
        if response.status_code == 404:
            raise ApiError(404, _detail(response) or MESSAGES[404])
        return _typed(_RECORD, response.json())

    def readiness(self) -> Readiness:
        """The API's readiness checks; a "fail" status with no checks when it cannot be reached."""
        try:
            return _typed(_READINESS, httpx.get(self.base_url + "/health/ready", timeout=5).json())
        except (httpx.HTTPError, ValueError, ApiError):
            return {"status": "fail", "checks": {}, "warnings": []}
