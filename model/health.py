"""``python -m model.health``: exit 0 when a worker on this host has a live heartbeat (for
container healthchecks)."""

from __future__ import annotations

import socket
import sys

import redis

from contracts import keys
from model.config import get_model_settings


def main() -> int:
    settings = get_model_settings()
    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=2)
    pattern = keys.heartbeat_key(settings.worker_id or f"{socket.gethostname()}-*")
    try:
        return 0 if any(True for _ in client.scan_iter(match=pattern, count=1000)) else 1
    except redis.exceptions.RedisError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
