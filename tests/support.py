"""Helpers the tests share: free ports, subprocess services, waiting."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import redis

from api.app.core.config import Settings

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
PHOTOS = SHARED / "data" / "photos"
QUICKDRAW = SHARED / "data" / "quickdraw"
ARTIFACTS = ROOT / "test-artifacts"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


class Service:
    """A child process whose output goes to a log file under test-artifacts."""

    def __init__(self, name: str, args: list[str], env: dict[str, str]) -> None:
        ARTIFACTS.mkdir(exist_ok=True)
        self.name = name
        self.log_path = ARTIFACTS / f"{name}.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            args,
            env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 15) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()


def start_worker(name: str, redis_url: str, **extra: str) -> Service:
    env = {
        "REDIS_URL": redis_url,
        "WORKER_ID": name,
        "ALLOW_WEIGHT_DOWNLOAD": "false",
        "LOG_JSON": "true",
        "HEARTBEAT_INTERVAL_S": "0.5",
        "HEARTBEAT_TTL_S": "3",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        **extra,
    }
    return Service(name, [sys.executable, "-m", "model"], env)


def wait_for_worker(redis_url: str, worker: Service, timeout: float = 120) -> None:
    client = redis.Redis.from_url(redis_url)

    def ready() -> bool:
        if not worker.alive():
            raise RuntimeError(f"worker {worker.name} exited:\n{worker.log()[-3000:]}")
        return bool(client.exists(f"worker:{worker.name}"))

    wait_until(ready, timeout, f"worker {worker.name}")


class RedisServer:
    """A private redis-server on a free port, for tests that stop or restart Redis."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port)

        def up() -> bool:
            try:
                return bool(client.ping())
            except redis.exceptions.ConnectionError:
                return False

        wait_until(up, 10, "private redis-server")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


class PostgresServer:
    """A private PostgreSQL cluster on a free port, for tests that stop the database."""

    def __init__(self) -> None:
        import glob
        import tempfile

        self.bin = Path(sorted(glob.glob("/usr/lib/postgresql/*/bin"))[-1])
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="portal-pg-"))
        self.data = self.dir / "data"
        self._as_postgres = os.geteuid() == 0  # the server refuses to run as root

    def _run(self, *args: str) -> None:
        cmd = [str(self.bin / args[0]), *args[1:]]
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"

    def init(self) -> None:
        if self._as_postgres:
            import shutil

            shutil.chown(self.dir, "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres")

    def start(self) -> None:
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-o",
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1",
            "-l",
            str(self.dir / "log"),
            "-w",
            "start",
        )

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")


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
    port = free_port()
    api = Service(f"{name}-{port}", [sys.executable, "-m", "api"], api_env(settings, API_PORT=str(port), **overrides))
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if not api.alive():
            raise RuntimeError(f"{api.name} exited:\n{api.log()[-3000:]}")
        return http_ok(f"{url}/health/live")

    try:
        wait_until(up, 60, api.name, interval=0.3)
    except BaseException:
        api.stop()
        raise
    return api, url
