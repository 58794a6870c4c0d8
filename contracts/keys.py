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
BATCH_TURNS = "batches:turns"
"""A sorted set: for each account (``owner:<id>``) and batch (``batch:<id>``) the batch lane served,
when it was last served (the Redis server's clock, in microseconds); the least recent goes first."""
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


EXPLAIN_GROUP = "explainers"
"""Consumer group of the explainer processes on every explanation stream."""
EXPLAINER_PREFIX = "explainer:"
"""An explainer's heartbeat key (``explainer:<id>``, with a TTL) holds the Keras models it holds.
Kept apart from ``worker:`` so an explainer never counts as a model worker serving predictions."""


def explain_stream(model: str, version: int) -> str:
    """Requests for Grad-CAM heatmaps computed with the Keras graph of ``model@version`` (the twin a
    served version is explained with): a stream of their own, so they never queue before predictions."""
    return f"explain:{model}@{version}"


def explainer_key(explainer_id: str) -> str:
    return f"{EXPLAINER_PREFIX}{explainer_id}"


def explanation_key(owner_id: int, sha256: str, model: str, version: int) -> str:
    """One user's computed explanation of these bytes by this served version, cached with a TTL.
    Kept per user as answers are (``result_cache_key``): a shared entry's instant ``cached`` reply
    would tell a user that someone else had asked about the same image."""
    return f"explanation:{owner_id}:{sha256}:{model}@{version}"


def explanation_inflight_key(owner_id: int, sha256: str, model: str, version: int) -> str:
    """Held (SET NX, TTL the wait) by the request that asked an explainer for this explanation:
    the same user's other requests for it wait for the cached answer instead of asking again."""
    return f"explanation:inflight:{owner_id}:{sha256}:{model}@{version}"


def explanations_of_user_key(owner_id: int) -> str:
    """A sorted set of the user's explanation requests in an explainer's queue (request id, scored
    by its deadline): the per-user cap counts those not yet past their deadline."""
    return f"explanation:user:{owner_id}"


def owned_key_patterns(owner_id: int) -> list[str]:
    """SCAN patterns of every key holding what ``owner_id`` sent or was answered (cached answers
    and explanations, in-flight markers, the explanation queue's count): deleted with the user."""
    return [
        f"cache:{owner_id}:*",
        f"explanation:{owner_id}:*",
        f"explanation:inflight:{owner_id}:*",
        explanations_of_user_key(owner_id),
    ]


DELETED_OWNER_TTL = 30 * 86400
"""Seconds a deleted user's ``deleted_owner_key`` is kept: longer than any answer or explanation
computed for them may still come (a cached answer lives a day, an explanation a week)."""


def deleted_owner_key(owner_id: int) -> str:
    """Set when the user is deleted, before their keys (``owned_key_patterns``) are: whoever caches
    an answer or explanation for ``owner_id`` reads it in the same transaction as its write and
    deletes what it wrote when it is there. Either the write came before the deletion's scan,
    which finds it, or after this key was set, which the writer sees."""
    return f"owner:deleted:{owner_id}"


def explanation_done_key(request_id: str) -> str:
    """A list the explainer pushes the explanation to, which the waiting request BLPOPs."""
    return f"explanation:done:{request_id}"


DRIFT_LOCK = "drift:lock"
"""Held (SET NX with a TTL) by the API process computing the drift indices, so only one does per interval."""
