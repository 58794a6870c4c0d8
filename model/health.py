"""``python -m model.health``: exit 0 when a worker on this host has a live heartbeat (for
container healthchecks).

``python -m model.health --explainer`` asks the same of an explainer (``python -m model.explainer``),
whose heartbeat is a key of its own (``explainer:explainer-<worker id>``, listed in
``workers.LIVE_EXPLAINERS``) and never counts as a model worker's.
"""

from __future__ import annotations

import fnmatch
import socket
import sys

import redis

from contracts import keys, workers
from model.config import get_model_settings

EXPLAINER_FLAG = "--explainer"


def explainer_live(client: redis.Redis, pattern: str) -> bool:
    """Whether an explainer whose worker id matches ``pattern`` (a glob) has a live heartbeat:
    its key, or for a glob the explainers' index (``workers.LIVE_EXPLAINERS``), never a scan."""
    if not any(c in pattern for c in "*?["):
        return bool(client.exists(keys.explainer_key(f"explainer-{pattern}")))
    wanted = f"explainer-{pattern}"
    return any(fnmatch.fnmatchcase(beat.explainer_id, wanted) for beat in workers.live_explainer_heartbeats(client))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if set(args) - {EXPLAINER_FLAG}:
        print(f"usage: python -m model.health [{EXPLAINER_FLAG}]", file=sys.stderr)
        return 2
    settings = get_model_settings()
    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=2)
    # A worker's id is WORKER_ID, or <hostname>-<pid>: any process of this host (this pod) counts.
    pattern = settings.worker_id or f"{socket.gethostname()}-*"
    try:
        if EXPLAINER_FLAG in args:
            return 0 if explainer_live(client, pattern) else 1
        live = workers.live_heartbeats(client)
        return 0 if any(fnmatch.fnmatchcase(beat.worker_id, pattern) for beat in live) else 1
    except redis.exceptions.RedisError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
