"""The model container's healthcheck: a live heartbeat of this worker in Redis."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support import ROOT


@pytest.mark.usefixtures("worker")
def test_healthcheck_follows_the_heartbeat(redis_url: str) -> None:
    def check(worker_id: str) -> int:
        env = {"REDIS_URL": redis_url, "WORKER_ID": worker_id, "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
        return subprocess.run([sys.executable, "-m", "model.health"], env=env, cwd=ROOT, timeout=60).returncode

    assert check("test-worker-1") == 0
    assert check("no-such-worker") == 1
