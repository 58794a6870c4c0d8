"""The model container's healthcheck: a live heartbeat of this worker in Redis."""

from __future__ import annotations

import subprocess
import sys

from tests.support import ROOT, Service


def test_healthcheck_follows_the_heartbeat(redis_url: str, worker: Service) -> None:
    def check(worker_id: str) -> int:
        env = {"REDIS_URL": redis_url, "WORKER_ID": worker_id, "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
        return subprocess.run([sys.executable, "-m", "model.health"], env=env, cwd=ROOT, timeout=60).returncode

    assert check(worker.name) == 0
    assert check("no-such-worker") == 1


def test_the_explainers_healthcheck_follows_its_own_heartbeat(redis_url: str) -> None:
    """An explainer's heartbeat (explainer:explainer-<id>) is checked with --explainer, by its id
    or by this host's name, and never passes for a model worker."""
    import socket

    import redis

    from contracts import keys

    def check(*args: str, worker_id: str | None = None) -> int:
        env = {"REDIS_URL": redis_url, "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
        if worker_id is not None:
            env["WORKER_ID"] = worker_id
        return subprocess.run([sys.executable, "-m", "model.health", *args], env=env, cwd=ROOT, timeout=60).returncode

    client = redis.Redis.from_url(redis_url)
    assert check("--explainer", worker_id="test-explainer-1") == 1
    client.set(keys.explainer_key("explainer-test-explainer-1"), "{}", px=10_000)
    assert check("--explainer", worker_id="test-explainer-1") == 0
    assert check("--explainer", worker_id="test-explainer-2") == 1
    assert check(worker_id="test-explainer-1") == 1, "an explainer is not a model worker"
    # In a pod: no WORKER_ID, the id is <hostname>-<pid>.
    assert check("--explainer") == 1
    client.set(keys.explainer_key(f"explainer-{socket.gethostname()}-4242"), "{}", px=10_000)
    assert check("--explainer") == 0
    assert check("--bogus") == 2
