"""Prometheus metrics of the API: HTTP latency (by the instrumentator) and the job pipeline.

Timings reported by workers are observed here, when a result is stored, so one scrape target
covers every worker. With several API processes set PROMETHEUS_MULTIPROC_DIR (prometheus-client's
multiprocess mode) so that /metrics adds them up. Counters and histograms keep a dead process's
counts; the gauges show live processes only: a process removes its gauge files when it stops, and
a starting one removes those of processes that died without doing so.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter as Tally
from collections.abc import Callable, Iterable
from pathlib import Path

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.multiprocess import mark_process_dead
from prometheus_fastapi_instrumentator import metrics as http_metrics

from contracts.messages import PredictionStatus, ResultMessage

SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH = (1, 2, 4, 8, 16, 32, 64)
MODEL = ("model", "version")


def _http_metrics() -> Callable[[http_metrics.Info], None]:
    made = http_metrics.default()
    if made is None:  # the library's answer when the names are taken in this process's registry
        raise RuntimeError("the HTTP metrics' names are already registered")
    return made


HTTP = _http_metrics()
"""The instrumentator's HTTP metrics (``http_requests_total``, ``http_request_duration_seconds``,
...), made once per process and given to every app's instrumentator: left to make its own, an
app's instrumentator finds the names taken by an earlier app of the same process and records
nothing."""
QUEUE_WAIT = Histogram("portal_queue_wait_seconds", "Time a job waited in the queue", MODEL, buckets=SECONDS)
PREPROCESS = Histogram("portal_preprocess_seconds", "Preprocessing time per image", MODEL, buckets=SECONDS)
INFERENCE = Histogram("portal_inference_seconds", "Batched inference time", MODEL, buckets=SECONDS)
END_TO_END = Histogram("portal_end_to_end_seconds", "Enqueue to answer", MODEL, buckets=SECONDS)
BATCH_SIZE = Histogram("portal_batch_size", "Jobs per batched inference", MODEL, buckets=BATCH)
JOBS = Counter(
    "portal_jobs",
    "Answers to users' predictions by outcome (done, failed, expired, rejected)",
    ("model", "version", "status"),
)
CACHE = Counter("portal_result_cache", "Result cache lookups", ("result",))
RECLAIMED = Counter("portal_reclaimed_jobs", "Jobs answered after another worker had taken them", MODEL)
DEAD_LETTERED = Counter("portal_dead_lettered_jobs", "Jobs given up after too many deliveries", MODEL)
FEEDBACK = Counter("portal_feedback", "Users' verdicts on answers (correct, wrong)", ("model", "version", "verdict"))
ROUTED = Counter(
    "portal_routed_requests",
    "Requests naming a model without a version (or the default model), by the version routing chose",
    MODEL,
)
# Every API process reads these from Redis, so the newest reading of a live process is the value.
QUEUE_DEPTH = Gauge("portal_queue_depth", "Jobs waiting or being computed", MODEL, multiprocess_mode="livemostrecent")
TRAFFIC_WEIGHT = Gauge(
    "portal_traffic_weight_share",
    "Share of a model's routed requests its registry weights give a version (0 to 1)",
    MODEL,
    multiprocess_mode="livemostrecent",
)
SHADOW_ANSWERS = Gauge(
    "portal_shadow_answers",
    "Copies a shadow version answered in the last hour whose mirrored answer is done",
    MODEL,
    multiprocess_mode="livemostrecent",
)
SHADOW_AGREEMENT = Gauge(
    "portal_shadow_agreement",
    "Share of those copies whose top-1 label equals the mirrored answer's (0 to 1)",
    MODEL,
    multiprocess_mode="livemostrecent",
)
DRIFT_PSI = Gauge(
    "portal_drift_psi",
    "Population stability index of a signal of a version's recent predictions against its first ones "
    "(above 0.25: drift)",
    [*MODEL, "signal"],
    multiprocess_mode="livemostrecent",
)
LIVE_WORKERS = Gauge(
    "portal_live_workers",
    "Model workers with a live heartbeat the API can read (0 while Redis is out of its reach)",
    multiprocess_mode="livemostrecent",
)
DEPENDENCY_UP = Gauge(
    "portal_dependency_up",
    "1 when the API reached the dependency (redis, postgresql) at its last gauge refresh, else 0",
    ("dependency",),
    multiprocess_mode="livemostrecent",
)

LIVE_GAUGE_FILE = re.compile(r"gauge_live[a-z]+_(\d+)\.db")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def forget_dead_processes() -> list[int]:
    """Removes the live-gauge files of processes in PROMETHEUS_MULTIPROC_DIR that no longer run
    (killed, or crashed and restarted by uvicorn) and returns their pids; nothing without the
    variable."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not path:
        return []
    pids = {int(m[1]) for f in Path(path).iterdir() if (m := LIVE_GAUGE_FILE.fullmatch(f.name))}
    dead = sorted(pid for pid in pids if pid != os.getpid() and not _running(pid))
    for pid in dead:
        mark_process_dead(pid, path)
    return dead


def forget_this_process() -> None:
    """Removes this process's live-gauge files, when it stops; nothing without PROMETHEUS_MULTIPROC_DIR."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        mark_process_dead(os.getpid())


def forget_queue_depths() -> None:
    """Stops exporting ``portal_queue_depth`` until it is read again (Redis out of reach): no
    sample rather than a frozen one. prometheus-client cannot remove a sample in multiprocess
    mode, so there each becomes NaN, which no comparison in an alert matches."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        for labels in QUEUE_DEPTH._metrics:  # the label values this process has set
            QUEUE_DEPTH.labels(*labels).set(math.nan)
    else:
        QUEUE_DEPTH.clear()


def count_expired(expired: Iterable[tuple[str, int]]) -> None:
    """Counts in ``portal_jobs_total`` (status ``expired``) the predictions the API itself expired
    (deadline passed, version retired or disabled), one ``(model, version)`` pair per prediction.
    Each is counted once: a worker's later answer to it finds it final, changes nothing and is
    not counted (``observe_result`` sees only answers that were stored)."""
    _count_ended(expired, PredictionStatus.expired)


def count_failed(failed: Iterable[tuple[str, int]]) -> None:
    """Counts in ``portal_jobs_total`` (status ``failed``) the predictions the API itself failed
    (the job queue out of reach when sent, the image's stored file missing, an answer that could
    not be stored), one ``(model, version)`` pair per prediction, once each as ``count_expired``."""
    _count_ended(failed, PredictionStatus.failed)


def _count_ended(ended: Iterable[tuple[str, int]], status: PredictionStatus) -> None:
    for (name, version), n in Tally(ended).items():
        JOBS.labels(name, str(version), status.value).inc(n)


def observe_result(result: ResultMessage) -> None:
    """Counts a worker's answer that was stored (its prediction was still open) in
    ``portal_jobs_total`` and, for a done one, observes its timings."""
    labels = (result.model, str(result.version))
    JOBS.labels(*labels, result.status.value).inc()
    if result.delivery > 1:
        RECLAIMED.labels(*labels).inc()
    if result.dead_lettered:
        DEAD_LETTERED.labels(*labels).inc()
    if result.status is not PredictionStatus.done:
        return
    t = result.timings
    QUEUE_WAIT.labels(*labels).observe(t.queue_ms / 1000)
    PREPROCESS.labels(*labels).observe(t.preprocess_ms / 1000)
    INFERENCE.labels(*labels).observe(t.inference_ms / 1000)
    END_TO_END.labels(*labels).observe(t.total_ms / 1000)
    BATCH_SIZE.labels(*labels).observe(t.batch_size)
