"""A worker follows the registry the API publishes: new versions loaded and served, dropped ones
let go (their memory returned), without a restart."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import redis
import redis.asyncio

from contracts import keys, registry_live, workers
from contracts.messages import NOT_TRAINED_YET, ModelState, being_trained
from contracts.registry import Channel, ModelEntry, Registry, load_registry
from contracts.registry_live import RegistrySnapshot
from model.config import ModelSettings
from model.prepare import DEFAULT_CATEGORIES, prepare_trained, training_key
from model.runtimes import resolve
from model.store import clear_progress, write_progress
from model.worker import Worker
from tests.support import ROOT, RedisServer, model_env, start_worker, wait_for_worker, wait_until

FILE = load_registry()


def entry(key: str, channel: Channel = "stable") -> ModelEntry:
    return FILE.get(key).model_copy(update={"channel": channel})


def publish(url: str, revision: int, models: list[ModelEntry], source: str = "test") -> bool:
    async def go() -> bool:
        client = redis.asyncio.Redis.from_url(url)
        try:
            snapshot = RegistrySnapshot(
                revision=revision, source=source, registry=Registry(default_order=[], models=models)
            )
            return await registry_live.publish(client, snapshot)
        finally:
            await client.aclose()

    return asyncio.run(go())


def serving(client: redis.Redis, name: str) -> set[str]:
    beats = [b for b in workers.live_heartbeats(client) if b.worker_id == name]
    return {f"{m.name}@{m.version}" for b in beats for m in b.models if m.ready}


def test_a_worker_follows_the_published_registry(private_redis: RedisServer) -> None:
    url = private_redis.url
    client = redis.Redis.from_url(url)
    assert publish(url, 1, [entry("sketch@1"), entry("sketch@2", "retired")])
    worker = start_worker("follower", url, SERVE_MODELS="sketch,mobilenet_v2", REGISTRY_CHECK_S="1")
    try:
        wait_for_worker(url, worker)
        wait_until(lambda: serving(client, "follower") == {"sketch@1"}, 60, "sketch@1 served")

        # A version added: loaded, warmed up and served within seconds, its stream ready for jobs.
        assert publish(url, 2, [entry("sketch@1"), entry("sketch@2", "canary"), entry("mobilenet_v2@1", "canary")])
        wait_until(
            lambda: serving(client, "follower") == {"sketch@1", "sketch@2", "mobilenet_v2@1"}, 30, "new versions"
        )
        assert client.xinfo_groups(keys.job_stream("sketch", 2))[0]["name"] == keys.JOB_GROUP.encode()
        assert client.exists(keys.labels_key("sketch", 2))
        process = psutil.Process(worker.proc.pid)
        loaded_rss = process.memory_info().rss

        # An older revision is never published over a newer one.
        assert not publish(url, 1, [entry("sketch@1")])

        # A revision written without an announcement (a missed message) is found by the periodic
        # check; the versions it retires are let go and their memory returned.
        snapshot = RegistrySnapshot(
            revision=3,
            source="test",
            registry=Registry(
                default_order=[],
                models=[entry("sketch@2"), entry("sketch@1", "retired"), entry("mobilenet_v2@1", "retired")],
            ),
        )
        client.hset(
            keys.REGISTRY_KEY,
            mapping={"revision": "3", "source": "test", "registry": snapshot.registry.model_dump_json()},
        )
        wait_until(lambda: serving(client, "follower") == {"sketch@2"}, 15, "retired versions dropped")
        # The heartbeat thread may announce the change a moment before the memory is handed back.
        try:
            wait_until(lambda: loaded_rss - process.memory_info().rss > 10 * 2**20, 5, "memory returned")
        except TimeoutError:
            freed = loaded_rss - process.memory_info().rss
            raise AssertionError(f"only {freed / 2**20:.1f} MiB returned") from None
        assert worker.alive()
    finally:
        worker.stop()


@pytest.mark.parametrize("serve_models", ["nosuchmodel", "sketch,sketch@99"])
def test_a_worker_told_to_serve_a_model_no_registry_has_stops_at_once(
    private_redis: RedisServer, serve_models: str
) -> None:
    """With a registry published, as without one (``test_worker.py``), a SERVE_MODELS reference
    that matches no model version of the registry stops the worker at start-up, in one line
    naming it, and its healthcheck fails: it never serves nothing while looking healthy."""
    url = private_redis.url
    assert publish(url, 1, [entry("sketch@1"), entry("sketch@2", "retired")])
    env = {**os.environ, **model_env("w3", url), "SERVE_MODELS": serve_models, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "model"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 1, done.stderr[-3000:]
    unknown = serve_models.split(",")[-1]
    assert done.stderr.strip().splitlines()[-1] == (
        "model worker refuses to start:"
        f" SERVE_MODELS={serve_models!r}: {unknown!r} matches no model version in the registry; served: sketch@1"
    ), done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    health = subprocess.run([sys.executable, "-m", "model.health"], env=env, cwd=ROOT, capture_output=True, timeout=60)
    assert health.returncode == 1


def test_a_worker_waits_for_a_model_whose_versions_are_all_retired_for_now(private_redis: RedisServer) -> None:
    """A model of the registry with no version served at the moment (every one retired or disabled
    by an admin) is no mistake in SERVE_MODELS: the worker starts, serves nothing, and loads the
    version the registry serves next."""
    url = private_redis.url
    client = redis.Redis.from_url(url)
    assert publish(url, 1, [entry("sketch@1", "retired"), entry("mobilenet_v2@1")])
    worker = start_worker("waiting", url, SERVE_MODELS="sketch", REGISTRY_CHECK_S="1")
    try:
        wait_for_worker(url, worker)
        assert serving(client, "waiting") == set() and worker.alive()
        assert publish(url, 2, [entry("sketch@1"), entry("mobilenet_v2@1")])
        wait_until(lambda: serving(client, "waiting") == {"sketch@1"}, 60, "sketch@1 served")
    finally:
        worker.stop()


def reasons(client: redis.Redis, name: str) -> dict[str, str | None]:
    beats = [b for b in workers.live_heartbeats(client) if b.worker_id == name]
    return {f"{m.name}@{m.version}": m.reason for b in beats for m in b.models if not m.ready}


def test_a_version_trained_while_the_worker_serves_is_loaded_once_written(
    private_redis: RedisServer, tmp_path: Path, model_settings: ModelSettings
) -> None:
    """`make run` serves before ``model.prepare`` has trained every version: a version whose
    model file is missing is reported as not trained yet, then loaded and served once training
    (here, its copy from the training cache) writes the file, without a restart or a new
    registry revision."""
    url = private_redis.url
    client = redis.Redis.from_url(url)
    sketch = entry("sketch@1")
    assert sketch.training is not None
    options = dict(sketch.training)
    categories = str(options.pop("categories", DEFAULT_CATEGORIES)).split(",")
    settings = model_settings.model_copy(
        update={"trained_dir": tmp_path / "trained", "training_cache_dir": tmp_path / "cache"}
    )
    out = sketch.resolve(sketch.file or "", models_dir=settings.models_dir, trained_dir=settings.trained_dir).parent
    trained = sketch.resolve(
        sketch.file or "", models_dir=model_settings.models_dir, trained_dir=model_settings.trained_dir
    ).parent
    shutil.copytree(trained, settings.training_cache_dir / training_key(options, categories, settings.quickdraw_dir))
    assert publish(url, 1, [sketch])
    worker = start_worker(
        "late", url, SERVE_MODELS="sketch", REGISTRY_CHECK_S="1", TRAINED_DIR=str(settings.trained_dir)
    )
    try:
        wait_for_worker(url, worker)
        wait_until(lambda: "sketch@1" in reasons(client, "late"), 60, "sketch@1 reported")
        assert (reasons(client, "late")["sketch@1"] or "").startswith(NOT_TRAINED_YET)
        time.sleep(2)  # checks pass while the file is missing
        assert serving(client, "late") == set() and worker.alive()
        # While a training notes its progress, the worker reports how far it is.
        write_progress(out / "model.keras", epoch=3, epochs=8)
        wait_until(
            lambda: being_trained(reasons(client, "late")["sketch@1"] or "") == (3, 8), 30, "the progress reported"
        )
        assert (reasons(client, "late")["sketch@1"] or "").startswith(NOT_TRAINED_YET)
        # Once the note is gone (the training ended or died), so is the progress.
        clear_progress(out / "model.keras")
        wait_until(
            lambda: being_trained(reasons(client, "late")["sketch@1"] or "") is None, 30, "the progress withdrawn"
        )
        assert (reasons(client, "late")["sketch@1"] or "").startswith(NOT_TRAINED_YET)

        prepare_trained(sketch, out, settings)
        wait_until(lambda: serving(client, "late") == {"sketch@1"}, 30, "sketch@1 served once written")
        assert client.xinfo_groups(keys.job_stream("sketch", 1))[0]["name"] == keys.JOB_GROUP.encode()
        assert client.exists(keys.labels_key("sketch", 1))
    finally:
        worker.stop()


def test_a_version_failing_for_another_reason_keeps_that_reason(
    private_redis: RedisServer, model_settings: ModelSettings, tmp_path: Path
) -> None:
    """A progress note beside a version whose model failed to load for another reason (its labels,
    say) never turns that reason into "not trained yet"."""
    settings = model_settings.model_copy(update={"redis_url": private_redis.url, "trained_dir": tmp_path})
    worker = Worker(settings)
    sketch = entry("sketch@1")
    model_file = resolve(sketch, sketch.file or "", settings)
    write_progress(model_file, epoch=2, epochs=8)
    broken = ModelState(name="sketch", version=1, ready=False, reason="failed to load: labels file unreadable")
    worker._set_state(sketch, broken)
    worker._renew_not_trained(sketch)
    assert worker.states["sketch@1"] == broken
    untrained = broken.model_copy(update={"reason": f"{NOT_TRAINED_YET}: {model_file} not found"})
    worker._set_state(sketch, untrained)
    worker._renew_not_trained(sketch)
    assert being_trained(worker.states["sketch@1"].reason or "") == (2, 8)
