"""Prometheus metrics of the API: HTTP latency (by the instrumentator) and the job pipeline.

Timings reported by workers are observed here, when a result is stored, so one scrape target
covers every worker. With several API processes set PROMETHEUS_MULTIPROC_DIR (prometheus-client's
multiprocess mode) so that /metrics adds them up.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from contracts.messages import PredictionStatus, ResultMessage

SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH = (1, 2, 4, 8, 16, 32, 64)
MODEL = ("model", "version")

QUEUE_WAIT = Histogram("portal_queue_wait_seconds", "Time a job waited in the queue", MODEL, buckets=SECONDS)
PREPROCESS = Histogram("portal_preprocess_seconds", "Preprocessing time per image", MODEL, buckets=SECONDS)
INFERENCE = Histogram("portal_inference_seconds", "Batched inference time", MODEL, buckets=SECONDS)
END_TO_END = Histogram("portal_end_to_end_seconds", "Enqueue to answer", MODEL, buckets=SECONDS)
BATCH_SIZE = Histogram("portal_batch_size", "Jobs per batched inference", MODEL, buckets=BATCH)
JOBS = Counter(
    "portal_jobs", "Model answers by outcome (done, failed, expired, rejected)", ("model", "version", "status")
)
CACHE = Counter("portal_result_cache", "Result cache lookups", ("result",))
RECLAIMED = Counter("portal_reclaimed_jobs", "Jobs answered after another worker had taken them", MODEL)
DEAD_LETTERED = Counter("portal_dead_lettered_jobs", "Jobs given up after too many deliveries", MODEL)
FEEDBACK = Counter("portal_feedback", "Users' verdicts on answers (correct, wrong)", ("model", "version", "verdict"))
QUEUE_DEPTH = Gauge("portal_queue_depth", "Jobs waiting or being computed", MODEL, multiprocess_mode="max")
LIVE_WORKERS = Gauge("portal_live_workers", "Model workers with a live heartbeat", multiprocess_mode="max")


def observe_result(result: ResultMessage) -> None:
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
