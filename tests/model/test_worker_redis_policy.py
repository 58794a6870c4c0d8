"""A model worker on a Redis that may evict keys: it refuses to start, and stops when it
reconnects to one, unless ALLOW_REDIS_EVICTION says to serve anyway. Each test has a private
redis-server."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import redis

from contracts import keys
from tests.support import ROOT, RedisServer, start_worker, wait_for_worker, wait_until

LRU = ("--maxmemory-policy", "allkeys-lru")


def test_a_worker_refuses_an_evicting_redis_with_one_clear_line() -> None:
    server = RedisServer(*LRU)
    server.start()
    try:
        env = {**os.environ, "REDIS_URL": server.url, "WORKER_ID": "evicting-worker", "PYTHONPATH": str(ROOT)}
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "model"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        took = time.monotonic() - started
        announced = redis.Redis.from_url(server.url).exists(keys.heartbeat_key("evicting-worker"))
    finally:
        server.stop()
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("model worker evicting-worker refuses to start: Redis's maxmemory-policy is allkeys-lru")
    assert "ALLOW_REDIS_EVICTION=true" in last and "Traceback" not in done.stderr
    assert not announced, "the worker announced itself on a Redis it refuses"
    assert took < 60, f"refused only after {took:.0f} s (the models were loaded first?)"


def test_allowed_a_worker_serves_and_warns() -> None:
    server = RedisServer(*LRU)
    server.start()
    # (A name of its own: the log file is appended to, run after run.)
    worker = start_worker(
        f"evicting-allowed-{time.monotonic_ns()}", server.url, SERVE_MODELS="sketch@1", ALLOW_REDIS_EVICTION="true"
    )
    try:
        wait_for_worker(server.url, worker)
        log = worker.log()
    finally:
        worker.stop()
        server.stop()
    [warning] = [line for line in log.splitlines() if "maxmemory-policy is allkeys-lru" in line]
    assert '"level": "WARNING"' in warning and "ALLOW_REDIS_EVICTION=true" in warning


def test_a_worker_that_reconnects_to_an_evicting_redis_stops() -> None:
    """Redis restarted with another configuration (or replaced by a managed one) under a running
    worker: the worker reads the policy again when it reconnects, and stops saying why."""
    server = RedisServer()
    server.start()
    worker = start_worker(f"reconnecting-{time.monotonic_ns()}", server.url, SERVE_MODELS="sketch@1")
    try:
        wait_for_worker(server.url, worker)
        assert "maxmemory-policy" not in worker.log()  # noeviction: nothing to say
        server.stop()
        time.sleep(1.5)  # the worker sees the outage
        server.extra_args = list(LRU)
        server.start()
        wait_until(lambda: not worker.alive(), 30, "the worker to stop")
        assert worker.proc.returncode == 1
        log = worker.log()
    finally:
        worker.stop()
        server.stop()
    assert f"model worker {worker.name} stops: Redis's maxmemory-policy is allkeys-lru" in log
