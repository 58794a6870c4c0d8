"""GET /metrics after real jobs: HTTP latency, the job pipeline, cache, queue depth, workers."""

from __future__ import annotations

import asyncio
import sys

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from api.app.core.config import Settings
from tests.api.test_predictions import noise_png
from tests.conftest import Users
from tests.support import Service, free_port, wait_until


async def scrape(client: httpx.AsyncClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = (await client.get("/metrics")).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.mark.usefixtures("worker")
async def test_metrics_after_real_jobs(client: httpx.AsyncClient, users: Users) -> None:
    _, headers = await users.create()
    before = await scrape(client)
    data = noise_png()
    for _ in range(2):  # the second answer comes from the cache
        r = await client.post(
            "/model/predict", params={"models": "mobilenet_v2"}, files={"file": ("n.png", data)}, headers=headers
        )
        assert r.status_code == 200
    await asyncio.sleep(1.5)  # the gauges are refreshed by the reconciler every second here
    after = await scrape(client)
    model = {"model": "mobilenet_v2", "version": "1"}

    def grew(name: str, by: float = 1, **labels: str) -> bool:
        return value(after, name, **labels) - value(before, name, **labels) >= by

    assert grew("http_request_duration_seconds_count", 2, handler="/model/predict", method="POST")
    assert grew("portal_jobs_total", 1, **model, status="done")
    assert grew("portal_result_cache_total", 1, result="hit") and grew("portal_result_cache_total", 1, result="miss")
    for histogram in (
        "portal_queue_wait_seconds",
        "portal_preprocess_seconds",
        "portal_inference_seconds",
        "portal_end_to_end_seconds",
        "portal_batch_size",
    ):
        assert grew(f"{histogram}_count", 1, **model), histogram
    assert value(after, "portal_inference_seconds_sum", **model) > 0
    assert value(after, "portal_end_to_end_seconds_sum", **model) >= value(
        after, "portal_inference_seconds_sum", **model
    )
    assert ("portal_queue_depth", tuple(sorted(model.items()))) in after
    assert value(after, "portal_live_workers") >= 1


def test_metrics_add_up_across_api_processes(settings: Settings) -> None:
    port = free_port()
    env = {
        "ENVIRONMENT": "test",
        "SECRET_KEY": settings.secret_key,
        "FIRST_ADMIN_PASSWORD": "admin-password-for-tests",
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": settings.redis_url,
        "STORAGE_DIR": str(settings.storage_dir),
        "API_HOST": "127.0.0.1",
        "API_PORT": str(port),
        "API_WORKERS": "2",
    }
    api = Service(f"metrics-api-{port}", [sys.executable, "-m", "api"], env)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{url}/health/live", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(up, 60, "two API processes", interval=0.3)
        for _ in range(29):  # 30 with the one above, each on a new connection
            assert httpx.get(f"{url}/health/live").status_code == 200
        counts = set()
        for _ in range(6):
            text = httpx.get(f"{url}/metrics").text
            samples = {
                (s.name, s.labels.get("handler")): s.value
                for f in text_string_to_metric_families(text)
                for s in f.samples
            }
            counts.add(samples[("http_request_duration_seconds_count", "/health/live")])
        assert counts == {30.0}, counts
        pids = {p.pid for p in psutil.Process(api.proc.pid).children(recursive=True)}
        assert len(pids) >= 2
    finally:
        api.stop()
