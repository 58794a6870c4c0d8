"""Weights & Biases logging of each inference, in wandb's offline mode."""

from __future__ import annotations

import asyncio
from pathlib import Path

from api.app.core.config import Settings
from api.app.main import create_app
from tests.api.test_predictions import noise_png
from tests.conftest import Users, client_for
from tests.support import RedisServer, start_worker, wait_for_worker


async def test_each_inference_is_logged_offline(
    settings: Settings, users: Users, tmp_path: Path, private_redis: RedisServer
) -> None:
    logged = settings.model_copy(
        update={
            "redis_url": private_redis.url,  # so that this app, not the suite's, collects the results
            "wandb_api_key": "offline-test-key",
            "wandb_mode": "offline",
            "wandb_dir": tmp_path,
        }
    )
    _, headers = await users.create()
    worker = start_worker(f"wandb-{private_redis.port}", private_redis.url)
    ids = []
    try:
        await asyncio.to_thread(wait_for_worker, private_redis.url, worker)
        async for client in client_for(create_app(logged)):
            for _ in range(2):
                r = await client.post(
                    "/model/predict",
                    params={"models": "sketch@1"},
                    files={"file": ("n.png", noise_png())},
                    headers=headers,
                )
                assert r.status_code == 200
                ids.append(r.json()["results"]["sketch@1"]["id"])
    finally:
        worker.stop()
    run_files = await asyncio.to_thread(lambda: list(tmp_path.glob("wandb/offline-run-*/run-*.wandb")))
    assert len(run_files) == 1
    data = await asyncio.to_thread(run_files[0].read_bytes)
    assert all(prediction_id.encode() in data for prediction_id in ids)
    assert b"inference_ms" in data and b"sketch@1" in data
