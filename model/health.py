"""``python -m model.health``: exit 0 when a worker on this host has a live heartbeat (for
container healthchecks)."""

from __future__ import annotations

import fnmatch
import socket
import sys

import redis

from contracts import workers
from model.config import get_model_settings


def main() -> int:
    settings = get_model_settings()
    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=2)
    pattern = settings.worker_id or f"{socket.gethostname()}-*"
    try:
        live = workers.live_heartbeats(client)
        return 0 if any(fnmatch.fnmatchcase(beat.worker_id, pattern) for beat in live) else 1
    except redis.exceptions.RedisError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
