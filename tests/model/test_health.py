"""The model container's healthcheck: a live heartbeat of this worker in Redis."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import redis

import model.health
from contracts import keys, workers
from contracts.messages import ExplainerHeartbeat
from tests.support import ROOT, RedisServer, Service


def test_healthcheck_follows_the_heartbeat(redis_url: str, worker: Service) -> None:
    def check(worker_id: str) -> int:
        env = {"REDIS_URL": redis_url, "WORKER_ID": worker_id, "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
        return subprocess.run([sys.executable, "-m", "model.health"], env=env, cwd=ROOT, timeout=60).returncode

    assert check(worker.name) == 0
    assert check("no-such-worker") == 1


def _announce_explainer(client: redis.Redis, explainer_id: str, ttl_ms: int = 10_000) -> None:
    beat = ExplainerHeartbeat(explainer_id=explainer_id, pid=1)
    with client.pipeline(transaction=False) as pipe:
        workers.announce_explainer(
            pipe, explainer_id=explainer_id, heartbeat_json=beat.model_dump_json(), ttl_ms=ttl_ms, now=time.time()
        )
        pipe.execute()


def test_the_explainers_healthcheck_follows_its_own_heartbeat(redis_url: str) -> None:
    """An explainer's heartbeat (explainer:explainer-<id>) is checked with --explainer, by its id
    or by this host's name, and never passes for a model worker."""

    def check(*args: str, worker_id: str | None = None) -> int:
        env = {"REDIS_URL": redis_url, "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
        if worker_id is not None:
            env["WORKER_ID"] = worker_id
        return subprocess.run([sys.executable, "-m", "model.health", *args], env=env, cwd=ROOT, timeout=60).returncode

    client = redis.Redis.from_url(redis_url)
    assert check("--explainer", worker_id="test-explainer-1") == 1
    _announce_explainer(client, "explainer-test-explainer-1")
    assert check("--explainer", worker_id="test-explainer-1") == 0
    assert check("--explainer", worker_id="test-explainer-2") == 1
    assert check(worker_id="test-explainer-1") == 1, "an explainer is not a model worker"
    # In a pod: no WORKER_ID, the id is <hostname>-<pid>.
    assert check("--explainer") == 1
    _announce_explainer(client, f"explainer-{socket.gethostname()}-4242")
    assert check("--explainer") == 0
    assert check("--bogus") == 2


def test_an_explainer_is_found_by_its_hosts_name_without_scanning_the_keyspace(private_redis: RedisServer) -> None:
    """In a pod the explainer is looked for by a glob of this host's name: with a day of cached
    answers in Redis, through the explainers' index in a few commands, not a SCAN of every key;
    one killed without withdrawing fails once its heartbeat expires."""
    client = redis.Redis.from_url(private_redis.url)
    with client.pipeline(transaction=False) as pipe:
        for i in range(50_000):
            pipe.set(keys.result_cache_key(1, f"{i:064x}", "sketch", 1), b"{}", ex=3600)
        pipe.execute()
    host = socket.gethostname()
    _announce_explainer(client, "explainer-elsewhere-1")
    client.config_resetstat()
    assert not model.health.explainer_live(client, f"{host}-*")
    calls = {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in client.info("commandstats").items()}
    calls = {name: n for name, n in calls.items() if not name.startswith("config")}
    assert "scan" not in calls and "keys" not in calls and sum(calls.values()) <= 3, calls
    _announce_explainer(client, f"explainer-{host}-4242", ttl_ms=300)
    assert model.health.explainer_live(client, f"{host}-*")
    time.sleep(0.5)
    assert not model.health.explainer_live(client, f"{host}-*")
