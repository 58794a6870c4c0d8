"""Redis key and stream names used by both services, in one place."""

JOB_GROUP = "workers"
RESULT_GROUP = "api"
RESULT_STREAM = "results"
DEAD_LETTER_STREAM = "jobs:dead"
RESULT_DEAD_LETTER_STREAM = "results:dead"
HEARTBEAT_PREFIX = "worker:"
QUEUE_EPOCH = "queue:epoch"
BATCH_WAKE = "batches:wake"
"""A list the API pushes to when a batch's job is answered, so the batch lane queues the next at
once instead of at its next poll."""
BATCH_REQUEST_PREFIX = "batch-"
"""The request id of a batch's jobs starts with this, followed by the batch's id."""


def job_stream(model: str, version: int) -> str:
    return f"jobs:{model}@{version}"


def heartbeat_key(worker_id: str) -> str:
    return f"{HEARTBEAT_PREFIX}{worker_id}"


def labels_key(model: str, version: int) -> str:
    return f"labels:{model}@{version}"


def job_done_key(job_id: str) -> str:
    return f"job:{job_id}:done"


def job_running_key(prediction_id: str) -> str:
    return f"prediction:{prediction_id}:running"


def result_cache_key(owner_id: int, sha256: str, model: str, version: int) -> str:
    """One user's earlier answer for these bytes: an answer is never reused for another user, whose
    instant reply would tell them that someone else had sent the same image."""
    return f"cache:{owner_id}:{sha256}:{model}@{version}"


REGISTRY_KEY = "registry:snapshot"
"""Hash: the model registry as the API last published it (``revision``, ``source``, ``registry``)."""
REGISTRY_CHANNEL = "registry:changed"
"""Pub/sub channel: a new registry revision was published (the message is the revision)."""
