"""End to end: Locust users against a real API process and real model workers on this machine.

The portal runs as in production (``python -m api``, ``python -m model``) against the local
PostgreSQL (a database of its own, dropped afterwards) and a private redis-server, with
BENCHMARK_MODE=true so the random-weight ResNet50 is served, and the result cache off so every
request is inferred. By default Locust users never pause (PORTAL_WAIT=0): the portal is saturated
from 10 users on, and the throughput measured is the most it sustains; statistics then start once
every user has logged in (PORTAL_RESET_AFTER_LOGIN=1), so the runs measure the steady state, not
the logins. With a pause (``--wait 1,5``, as the classic client pauses) every request counts, the
logins included: such a run checks that nothing fails, not how fast.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import redis
from sqlalchemy.engine import make_url

from api.app.core.db import APPLICATION_NAME
from bench.processes import Service, start_on_free_port, start_redis, wait_until
from contracts.messages import Heartbeat
from contracts.workers import live_heartbeats

log = logging.getLogger("bench.e2e")
ROOT = Path(__file__).resolve().parent.parent
EMAIL, PASSWORD = "bench@example.com", "bench-password-1"
OVERLOADED = "/model/predict [503 overloaded]"


@dataclass
class E2EResult:
    model: str
    workers: int
    threads_per_worker: int
    api_processes: int
    """API processes that served the run, counted from their named PostgreSQL connections
    (``API_WORKERS`` of them unless one failed to start)."""
    users: int
    seconds: float
    predictions: int
    throughput: float
    """Successful predictions per second."""
    predict_p50_ms: float
    predict_p90_ms: float
    predict_p99_ms: float
    users_requests: int
    users_p50_ms: float
    users_p99_ms: float
    failures: int
    overloaded: int
    """503 + Retry-After answers."""
    overloaded_pct: float
    worker_peak_rss_mib: float
    """Largest resident memory of any one worker during the run."""
    cpu_cores: dict[str, float] = field(default_factory=dict)
    """Cores used on average by each part (2.0 = both cores all the time)."""
    db_connections_opened: int = 0
    """PostgreSQL sessions the run opened on its database (pg_stat_database.sessions)."""
    wait: str = "0"
    """Each user's pause between tasks: "min,max" seconds, or "0" for none."""
    mix: str = "portal"
    """What users do: "portal" (predict and list users, 1:2), "predict" (only predict) or "login"
    (as "portal", each task logging in again first)."""
    logins: int = 0
    """``POST /login`` requests counted (each user's first one is before the statistics start
    in a saturating run)."""
    requests_per_s: float = 0.0
    """Every request of the run (logins included, with pauses), from Locust's aggregate."""
    all_p50_ms: float = 0.0
    all_p95_ms: float = 0.0
    cpu_ms_per_prediction: dict[str, float] = field(default_factory=dict)
    """``cpu_cores`` over the throughput: CPU milliseconds of each part per successful prediction
    (what its ``GET /user/`` calls cost included, in the "portal" mix). Also "portal" (API +
    PostgreSQL + Redis: the load generator is reported, never counted) and the workers' split,
    "worker_inference" (inside the models' inference calls, from the workers' heartbeats) and
    "worker_outside_inference" (decoding, resizing, messaging)."""


class Portal:
    """The running pieces and their environment."""

    def __init__(self, workdir: Path, database_url: str, models_dir: Path, api_workers: int) -> None:
        self.workdir = workdir
        self.database_url = database_url
        self.port = 0
        self.redis_port = 0
        self.env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "ENVIRONMENT": "development",
            "DATABASE_URL": database_url,
            "API_HOST": "127.0.0.1",
            "API_WORKERS": str(api_workers),
            "STORAGE_DIR": str(workdir / "storage"),
            "FIRST_ADMIN_EMAIL": EMAIL,
            "FIRST_ADMIN_PASSWORD": PASSWORD,
            "BENCHMARK_MODE": "true",
            "RESULT_CACHE_TTL_SECONDS": "0",
            "MAX_JOBS_IN_FLIGHT_PER_USER": "100000",
            "MODELS_DIR": str(models_dir),
            "ALLOW_WEIGHT_DOWNLOAD": "false",
            "LOG_LEVEL": "WARNING",
        }
        self.env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.processes: dict[str, Service] = {}
        self.redis: redis.Redis  # once start_redis has run

    def start(
        self, name: str, args: list[str], env: dict[str, str] | None = None, ready: Callable[[], bool] | None = None
    ) -> Service:
        """Starts a child logging to ``workdir/<name>.log``, once ``ready()`` is true if given."""
        service = Service(name, args, env or self.env, log_dir=self.workdir, cwd=ROOT)
        self.processes[name] = service.start(ready, timeout=60)
        return service

    def stop(self, name: str) -> None:
        self.processes.pop(name).stop()

    def start_redis(self, port: int) -> None:
        self.processes["redis"] = start_redis(port, log_dir=self.workdir, cwd=ROOT)
        self.redis_port = port
        self.redis = redis.Redis(port=port)
        self.env["REDIS_URL"] = f"redis://127.0.0.1:{port}/0"

    def start_api(self, port: int) -> None:
        self.port = port
        self.env["API_PORT"] = str(port)
        url = f"http://127.0.0.1:{port}/health/live"
        self.start("api", [sys.executable, "-m", "api"], ready=lambda: _answers(url))

    def start_workers(self, count: int, cores: int) -> None:
        for i in range(count):
            env = {**self.env, "WORKER_ID": f"bench-{i}", "INFERENCE_THREADS": str(max(1, cores // count))}
            self.start(f"worker-{i}", [sys.executable, "-m", "model"], env)

    def stop_workers(self) -> None:
        for name in [n for n in self.processes if n.startswith("worker-")]:
            self.stop(name)

    def wait_for_models(self, models: list[str], workers: int, timeout: float = 600) -> None:
        def ready() -> bool:
            live = [b for b in live_heartbeats(self.redis) if b.worker_id.startswith("bench-")]
            ready_models = [{f"{m.name}@{m.version}" for m in b.models if m.ready} for b in live]
            return len(live) == workers and all(set(models) <= r for r in ready_models)

        wait_until(ready, timeout, f"{workers} worker(s) serving {models}", interval=0.2)

    def pids(self, prefix: str) -> list[int]:
        return [p.proc.pid for n, p in self.processes.items() if n.startswith(prefix)]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@contextmanager
def portal(database_url: str, models_dir: Path, api_workers: int = 1) -> Iterator[Portal]:
    workdir = Path(tempfile.mkdtemp(prefix="portal-bench-"))
    p = Portal(workdir, database_url, models_dir, api_workers)
    try:
        start_on_free_port(p.start_redis)
        subprocess.run([sys.executable, "-m", "api.prestart"], env=p.env, cwd=ROOT, check=True, capture_output=True)
        start_on_free_port(p.start_api)
        yield p
    finally:
        for name in list(p.processes):
            p.stop(name)
        _drop_database(database_url)
        shutil.rmtree(workdir, ignore_errors=True)


def psql(database_url: str, sql: str, *, database: str = "postgres", check: bool = False) -> str:
    """Runs ``sql`` on the server of ``database_url``, connected to ``database``; its output.
    With ``check``, a failing statement raises ``subprocess.CalledProcessError``."""
    url = make_url(database_url)
    args = ["psql", "-h", url.host or "127.0.0.1", "-p", str(url.port or 5432), "-U", url.username or "postgres"]
    done = subprocess.run([*args, "-d", database, "-Atc", sql], check=check, capture_output=True, text=True)
    return done.stdout.strip()


def _drop_database(database_url: str) -> None:
    psql(database_url, f'DROP DATABASE IF EXISTS "{make_url(database_url).database}" WITH (FORCE)')


def sessions_opened(database_url: str) -> int:
    """How many connections have been opened on the database so far (PostgreSQL 14+). A new
    backend reports itself with its first transaction, or after about 10 s if it stays idle."""
    name = make_url(database_url).database
    return int(psql(database_url, f"SELECT sessions FROM pg_stat_database WHERE datname = '{name}'") or 0)


def api_processes(database_url: str) -> int:
    """How many API processes serve requests: each names its request connections
    ``portal-api:<pid>:requests`` in ``pg_stat_activity`` and keeps them open."""
    name = make_url(database_url).database
    sql = (
        "SELECT count(DISTINCT split_part(application_name, ':', 2)) FROM pg_stat_activity "
        f"WHERE datname = '{name}' AND application_name LIKE '{APPLICATION_NAME}:%:requests'"
    )
    return int(psql(database_url, sql) or 0)


class Sampler:
    """Peak memory of the workers and CPU time of every part, sampled in the background."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.cores: dict[str, float] = {}

    def _processes(self, name: str) -> list[psutil.Process]:
        if name == "postgres":
            return [p for p in psutil.process_iter(["name"]) if p.info["name"] == "postgres"]
        out = []
        for pid in self.groups.get(name, []):
            try:
                proc = psutil.Process(pid)
                out += [proc, *proc.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        return out

    def cpu(self) -> dict[str, float]:
        totals = {}
        for name in [*self.groups, "postgres"]:
            procs = self._processes(name)
            pids = {p.pid for p in procs}
            total = 0.0
            for proc in procs:
                try:
                    t = proc.cpu_times()
                    total += t.user + t.system
                    if name == "postgres" and proc.ppid() not in pids:
                        # Backends come and go with connections; the postmaster has reaped their time.
                        total += t.children_user + t.children_system
                except psutil.NoSuchProcess:
                    pass
            totals[name] = total
        return totals

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            for pid in self.groups.get("workers", []):
                with suppress(psutil.NoSuchProcess):
                    self.peak_rss = max(self.peak_rss, psutil.Process(pid).memory_info().rss)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def measure_cpu(self, seconds: float, heartbeats: Callable[[], list[Heartbeat]] | None = None) -> None:
        """Average cores each part uses over the next ``seconds``; with ``heartbeats`` (the
        workers' latest), also the cores the workers spent inside inference ("worker_inference"),
        from the counters their heartbeats carry."""
        start, started = self.cpu(), time.monotonic()
        beats = {b.worker_id: b for b in heartbeats()} if heartbeats else {}
        time.sleep(seconds)
        end, elapsed = self.cpu(), time.monotonic() - started
        self.cores = {k: round((end[k] - start.get(k, 0.0)) / elapsed, 3) for k in end}
        if heartbeats and (inference := inference_cores(beats, heartbeats())) is not None:
            self.cores["worker_inference"] = round(inference, 3)

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()


def inference_cores(before: dict[str, Heartbeat], after: list[Heartbeat]) -> float | None:
    """Cores the workers spent inside inference between two readings of their heartbeats: each
    worker's ``inference_cpu_seconds`` grown over the time between its two beats (a beat is a
    few seconds old when read, so each worker is timed by its own beats, not by the reader); a
    worker started (or restarted) since the first reading, from its start. None when no worker
    gives a figure: its beat did not change between the readings, or it counts no inference CPU
    (a worker older than the counter)."""
    cores: float | None = None
    for beat in after:
        if "inference_cpu_seconds" not in beat.model_fields_set:
            continue
        first = before.get(beat.worker_id)
        if first is not None and first.started_at == beat.started_at:
            cpu, seconds = beat.inference_cpu_seconds - first.inference_cpu_seconds, beat.sent_at - first.sent_at
        else:
            cpu, seconds = beat.inference_cpu_seconds, beat.sent_at - beat.started_at
        if seconds > 0:
            cores = (cores or 0.0) + cpu / seconds
    return cores


def per_prediction(cores: dict[str, float], throughput: float) -> dict[str, float]:
    """``cores`` (as ``Sampler.cores``) as CPU milliseconds per prediction at ``throughput``
    (predictions/s), with the sums the performance targets are about: "portal" (API, PostgreSQL
    and Redis) and "worker_outside_inference" (the workers' CPU less their inference)."""
    if throughput <= 0:
        return {}
    ms = {k: round(v / throughput * 1000, 2) for k, v in cores.items()}
    ms["portal"] = round(sum(ms.get(k, 0.0) for k in ("api", "postgres", "redis")), 2)
    if "worker_inference" in ms:
        ms["worker_outside_inference"] = round(ms.get("workers", 0.0) - ms["worker_inference"], 2)
    return ms


def run_locust(
    p: Portal, model: str, users: int, seconds: float, images: Path, wait: str = "0", mix: str = "portal"
) -> tuple[dict[str, dict], Sampler]:
    prefix = p.workdir / f"locust-{model}-{users}"
    saturating = wait == "0"
    env = {
        **p.env,
        "PORTAL_EMAIL": EMAIL,
        "PORTAL_PASSWORD": PASSWORD,
        "PORTAL_MODELS": model,
        "PORTAL_WAIT": wait,
        "PORTAL_RESET_AFTER_LOGIN": "1" if saturating else "",
        "PORTAL_IMAGES": str(images),
        "PORTAL_PREDICT_ONLY": "1" if mix == "predict" else "",
        "PORTAL_LOGIN_EVERY_TASK": "1" if mix == "login" else "",
    }
    args = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(ROOT / "stress_test" / "locustfile.py"),
        "--headless",
        "--only-summary",
        *(["--reset-stats"] if saturating else []),
        "-u",
        str(users),
        "-r",
        str(users),
        "-t",
        f"{seconds:.0f}s",
        "--host",
        f"http://127.0.0.1:{p.port}",
        "--csv",
        str(prefix),
    ]
    locust = p.start(f"locust-{users}", args, env)
    groups = {"api": p.pids("api"), "workers": p.pids("worker-"), "locust": p.pids("locust-"), "redis": p.pids("redis")}
    with Sampler(groups) as sampler:
        # CPU over the steady middle of the run, while every process is alive to be asked; the
        # users log in first, one password check (about 25 ms of CPU) at a time.
        settle = 3 + 0.03 * users
        time.sleep(settle)
        sampler.measure_cpu(max(1.0, seconds - settle - 2), heartbeats=lambda: live_heartbeats(p.redis))
        locust.proc.wait(seconds + 120)
    p.stop(f"locust-{users}")
    with open(f"{prefix}_stats.csv", newline="") as fh:
        rows = {row["Name"]: row for row in csv.DictReader(fh)}
    return rows, sampler


def _ms(row: dict | None, column: str) -> float:
    value = (row or {}).get(column, "0")
    return float(value) if value not in ("", "N/A") else 0.0


def measure(
    p: Portal,
    *,
    model: str,
    workers: int,
    users: int,
    seconds: float,
    images: Path,
    cores: int,
    wait: str = "0",
    mix: str = "portal",
) -> E2EResult:
    """One Locust run of ``users`` for ``seconds`` against ``model``; ``wait``: as ``PORTAL_WAIT``;
    ``mix``: as ``E2EResult.mix``."""
    opened = sessions_opened(p.database_url)
    rows, sampler = run_locust(p, model, users, seconds, images, wait, mix)
    opened = sessions_opened(p.database_url) - opened
    predict, listing, overloaded = rows.get("/model/predict"), rows.get("/user/"), rows.get(OVERLOADED)
    count, failures = int(_ms(predict, "Request Count")), int(_ms(predict, "Failure Count"))
    rejected = int(_ms(overloaded, "Request Count"))
    elapsed = count / _ms(predict, "Requests/s") if _ms(predict, "Requests/s") else seconds
    failures_total = sum(int(_ms(r, "Failure Count")) for name, r in rows.items() if name != "Aggregated")
    throughput = round((count - failures) / elapsed, 2)
    result = E2EResult(
        model=model,
        workers=workers,
        threads_per_worker=max(1, cores // workers),
        api_processes=api_processes(p.database_url),
        users=users,
        seconds=round(elapsed, 1),
        predictions=count - failures,
        throughput=throughput,
        predict_p50_ms=_ms(predict, "50%"),
        predict_p90_ms=_ms(predict, "90%"),
        predict_p99_ms=_ms(predict, "99%"),
        users_requests=int(_ms(listing, "Request Count")),
        users_p50_ms=_ms(listing, "50%"),
        users_p99_ms=_ms(listing, "99%"),
        failures=failures_total,
        overloaded=rejected,
        overloaded_pct=round(100 * rejected / max(1, count + rejected), 2),
        worker_peak_rss_mib=round(sampler.peak_rss / 2**20, 1),
        cpu_cores=sampler.cores,
        db_connections_opened=opened,
        wait=wait,
        mix=mix,
        logins=int(_ms(rows.get("/login"), "Request Count")),
        requests_per_s=round(_ms(rows.get("Aggregated"), "Requests/s"), 2),
        all_p50_ms=_ms(rows.get("Aggregated"), "50%"),
        all_p95_ms=_ms(rows.get("Aggregated"), "95%"),
        cpu_ms_per_prediction=per_prediction(sampler.cores, throughput),
    )
    log.info("%s", json.dumps(result.__dict__))
    return result
