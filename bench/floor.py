"""The stack's floor: what a prediction request costs the API process when it does only what the
portal must do, with the portal's libraries and none of its code around them.

``python -m bench.floor [--requests 300]`` starts one uvicorn process (uvloop and httptools, as
``python -m api`` runs) serving the app of this module, a private redis-server, a scratch
PostgreSQL database and a stub worker (a process that answers every queued job at once, and whose
CPU is not counted). It sends the same uploads as ``python -m bench.profile`` (a shared photo with
random bytes after its end, one request at a time) to six routes, each adding one step of a
prediction to the one before:

1. ``raw``: a bare ASGI callable reads the body and answers a few bytes of JSON;
2. ``multipart``: a FastAPI route takes the file from a multipart form (python-multipart) and
   answers a pydantic model;
3. ``checked``: + the image checked as the portal must before accepting it (``inspect_image``:
   decoded completely, in a worker thread), its SHA-256 and the blob written to disk (thread);
4. ``authed``: + a bearer token verified (python-jose, HS256) and its user read (asyncpg, one
   round trip);
5. ``stored``: + admission and the job stored in one transaction on asyncpg (BEGIN, the owner's
   row locked with the count of their unfinished jobs, INSERT, COMMIT: four round trips);
6. ``answered``: + the job and its image queued on a Redis stream (redis-py), the request waiting
   on its list (BLPOP) while a collector task reads the stub worker's answer from the results
   stream, stores it (one UPDATE) and wakes the request and acknowledges the answer (one
   pipeline).

For each route it prints the API process's CPU time per request (``/proc`` through psutil, as the
other benchmarks), what the route adds to the one before, PostgreSQL's and Redis's CPU per request
(the scratch database's backends and the private server), and the client's median latency. The
sixth route is the shape of ``POST /model/predict`` with nothing the portal adds: no SQLAlchemy,
no middleware, no metrics, logging or request ids, one dependency. Written to
``docs/benchmarks/floor.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, cast

import anyio
import asyncpg
import httpx
import psutil
import redis.asyncio as aioredis
from fastapi import Depends, FastAPI, File, Header, HTTPException, Request, UploadFile
from jose import jwt
from pydantic import BaseModel
from starlette.types import Receive, Scope, Send

from bench.processes import Service, free_port, start_on_free_port, start_redis
from bench.profile import fresh_photos
from contracts.imaging import inspect_image

ROOT = Path(__file__).resolve().parent.parent
ROUTES = ("raw", "multipart", "checked", "authed", "stored", "answered")
SECRET = "floor-benchmark-secret"
UVICORN = ("--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning")
"""What ``python -m api`` gets by default (uvicorn picks uvloop and httptools when installed), without
the access log the portal does not write either."""
JOBS = "floor:jobs"
RESULTS = "floor:results"
GROUP = "floor"
SCHEMA = """
CREATE TABLE floor_users (id integer PRIMARY KEY, email text NOT NULL, is_active boolean NOT NULL);
CREATE TABLE floor_jobs (
    id uuid PRIMARY KEY,
    owner_id integer NOT NULL REFERENCES floor_users (id),
    sha256 text NOT NULL,
    status text NOT NULL,
    answer jsonb,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ix_floor_jobs_unfinished ON floor_jobs (owner_id) WHERE status IN ('queued', 'running');
INSERT INTO floor_users VALUES (1, 'floor@example.com', true);
"""
ADMISSION = (
    "SELECT (SELECT count(*) FROM floor_jobs j WHERE j.owner_id = u.id AND j.status IN ('queued', 'running'))"
    " FROM floor_users u WHERE u.id = $1 FOR UPDATE"
)
Read = list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]] | None
"""What XREADGROUP answers a client without ``decode_responses``: (stream, [(entry id, fields)])."""
STORE = "UPDATE floor_jobs SET status = 'done', answer = $2 WHERE id = $1 AND status <> 'done' RETURNING owner_id"


class Accepted(BaseModel):
    """What the FastAPI routes answer."""

    file_name: str
    size: int
    answer: dict[str, Any] | None = None


# --- The app (runs in the uvicorn process) -------------------------------------------------------


@dataclass
class State:
    pool: asyncpg.Pool
    redis: aioredis.Redis
    blocking: aioredis.Redis
    blobs: Path


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    pool = await asyncpg.create_pool(os.environ["FLOOR_DATABASE_URL"], min_size=4, max_size=4)
    url = os.environ["FLOOR_REDIS_URL"]
    state = State(pool, aioredis.from_url(url), aioredis.from_url(url), Path(os.environ["FLOOR_BLOBS"]))
    app.state.floor = state
    collector = asyncio.create_task(_collect(state))
    yield
    collector.cancel()
    await pool.close()


async def _collect(state: State) -> None:
    """Stores each answer of the stub worker, then wakes its request and acknowledges it."""
    reader = aioredis.from_url(os.environ["FLOOR_REDIS_URL"])
    while True:
        got = cast(Read, await reader.xreadgroup(GROUP, "collector", {RESULTS: ">"}, count=64, block=1000))
        for _, entries in got or []:
            async with state.pool.acquire() as connection:
                for entry_id, fields in entries:
                    job_id = fields[b"job_id"].decode()
                    await connection.fetchval(STORE, uuid.UUID(job_id), fields[b"answer"].decode())
                    async with state.redis.pipeline(transaction=True) as pipe:
                        pipe.rpush(f"floor:done:{job_id}", fields[b"answer"])
                        pipe.expire(f"floor:done:{job_id}", 60)
                        pipe.xack(RESULTS, GROUP, entry_id)
                        await pipe.execute()


def _state(request: Request) -> State:
    state: State = request.app.state.floor
    return state


StateDep = Annotated[State, Depends(_state)]


async def _user(state: StateDep, authorization: Annotated[str, Header()]) -> int:
    claims = jwt.decode(authorization.removeprefix("Bearer "), SECRET, algorithms=["HS256"])
    async with state.pool.acquire() as connection:
        row = await connection.fetchrow("SELECT id, is_active FROM floor_users WHERE id = $1", int(claims["sub"]))
    if row is None or not row["is_active"]:
        raise HTTPException(status_code=401)
    user_id: int = row["id"]
    return user_id


UserDep = Annotated[int, Depends(_user)]
FileDep = Annotated[UploadFile, File()]


def _check_and_write(data: bytes, blobs: Path) -> str:
    inspect_image(data, max_pixels=50_000_000, preview_size=800)
    sha256 = hashlib.sha256(data).hexdigest()
    (blobs / sha256).write_bytes(data)
    return sha256


async def _checked(state: State, file: UploadFile) -> tuple[bytes, str]:
    data = await file.read()
    sha256 = await anyio.to_thread.run_sync(_check_and_write, data, state.blobs)
    return data, sha256


async def _store(state: State, owner_id: int, sha256: str) -> uuid.UUID:
    job_id = uuid.uuid4()
    async with state.pool.acquire() as connection, connection.transaction():
        in_flight = await connection.fetchval(ADMISSION, owner_id)
        if in_flight is None or in_flight >= 1000:
            raise HTTPException(status_code=429)
        await connection.execute(
            "INSERT INTO floor_jobs (id, owner_id, sha256, status) VALUES ($1, $2, $3, 'queued')",
            job_id,
            owner_id,
            sha256,
        )
    return job_id


def create_app() -> Any:
    """The floor's ASGI app: ``/raw`` bare, every other route through FastAPI."""
    app = FastAPI(lifespan=_lifespan)

    @app.post("/multipart")
    async def multipart(file: FileDep) -> Accepted:
        data = await file.read()
        return Accepted(file_name=file.filename or "", size=len(data))

    @app.post("/checked")
    async def checked(state: StateDep, file: FileDep) -> Accepted:
        data, _ = await _checked(state, file)
        return Accepted(file_name=file.filename or "", size=len(data))

    @app.post("/authed")
    async def authed(state: StateDep, user: UserDep, file: FileDep) -> Accepted:
        data, _ = await _checked(state, file)
        return Accepted(file_name=file.filename or "", size=len(data))

    @app.post("/stored")
    async def stored(state: StateDep, user: UserDep, file: FileDep) -> Accepted:
        data, sha256 = await _checked(state, file)
        await _store(state, user, sha256)
        return Accepted(file_name=file.filename or "", size=len(data))

    @app.post("/answered")
    async def answered(state: StateDep, user: UserDep, file: FileDep) -> Accepted:
        data, sha256 = await _checked(state, file)
        job_id = await _store(state, user, sha256)
        await state.redis.xadd(JOBS, {"job_id": str(job_id), "image": data})
        got = await state.blocking.blpop([f"floor:done:{job_id}"], timeout=10)
        if got is None:
            raise HTTPException(status_code=504)
        return Accepted(file_name=file.filename or "", size=len(data), answer=json.loads(got[1]))

    async def raw(scope: Scope, receive: Receive, send: Send) -> None:
        size = 0
        while True:
            message = await receive()
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"size":%d}' % size})

    async def dispatch(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/raw":
            await raw(scope, receive, send)
        else:
            await app(scope, receive, send)

    return dispatch


# --- The stub worker (its own process, not counted) -----------------------------------------------


def stub_worker(redis_url: str) -> None:
    """Answers every queued job at once with a fixed top-1, as a model worker's result message."""
    import redis as sync_redis

    client = sync_redis.Redis.from_url(redis_url)
    answer = json.dumps({"label": "tabby", "score": 0.9})
    while True:
        got = cast(Read, client.xreadgroup(GROUP, "worker", {JOBS: ">"}, count=16, block=1000))
        for _, entries in got or []:
            pipe = client.pipeline(transaction=False)
            for entry_id, fields in entries:
                pipe.xadd(RESULTS, {"job_id": fields[b"job_id"], "answer": answer})
                pipe.xack(JOBS, GROUP, entry_id)
                pipe.xdel(JOBS, entry_id)
            pipe.execute()


# --- The driver ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    route: str
    api_cpu_ms: float
    postgres_cpu_ms: float
    redis_cpu_ms: float
    latency_ms: float


def _psql(sql: str, database: str = "postgres") -> str:
    done = subprocess.run(
        ["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", database, "-Atc", sql],
        check=True,
        capture_output=True,
        text=True,
    )
    return done.stdout.strip()


@contextmanager
def _database() -> Iterator[str]:
    name = f"portal_floor_{os.getpid()}"
    _psql(f'CREATE DATABASE "{name}"')
    try:
        for statement in SCHEMA.strip().split(";\n"):
            _psql(statement, name)
        yield name
    finally:
        _psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _cpu_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        times = process.cpu_times()
        total += times.user + times.system
    return total


def measure(*, requests: int, photos: Path) -> list[Row]:
    """Sends ``requests`` uploads (after 20 for warm-up) to each route; one Row per route."""
    images = fresh_photos(photos)
    workdir = Path(tempfile.mkdtemp(prefix="portal-floor-"))
    blobs = workdir / "blobs"
    blobs.mkdir()
    with _database() as database:
        redis_ports: list[int] = []

        def start(port: int) -> Service:
            redis_ports.append(port)
            return start_redis(port, log_dir=workdir, cwd=ROOT)

        redis_service = start_on_free_port(start)
        redis_url = f"redis://127.0.0.1:{redis_ports[-1]}/0"
        setup = psutil.Process(redis_service.proc.pid)
        import redis as sync_redis

        with sync_redis.Redis.from_url(redis_url) as client:
            client.xgroup_create(JOBS, GROUP, id="0", mkstream=True)
            client.xgroup_create(RESULTS, GROUP, id="0", mkstream=True)
        env = {
            **os.environ,
            "FLOOR_DATABASE_URL": f"postgresql://postgres@127.0.0.1:5432/{database}",
            "FLOOR_REDIS_URL": redis_url,
            "FLOOR_BLOBS": str(blobs),
            "PYTHONPATH": str(ROOT),
        }
        port = free_port()
        api = Service(
            "floor-api",
            [sys.executable, "-m", "uvicorn", "bench.floor:create_app", "--factory", "--port", str(port), *UVICORN],
            env,
            log_dir=workdir,
            cwd=ROOT,
        ).start(lambda: _answers(port), timeout=60)
        worker = Service(
            "floor-worker",
            [sys.executable, "-m", "bench.floor", "--stub-worker", redis_url],
            env,
            log_dir=workdir,
            cwd=ROOT,
        ).start()
        try:
            backends = [
                psutil.Process(int(pid))
                for pid in _psql(f"SELECT pid FROM pg_stat_activity WHERE datname = '{database}'").split()
            ]
            token = jwt.encode({"sub": "1", "exp": int(time.time()) + 3600}, SECRET, algorithm="HS256")
            rows: list[Row] = []
            api_process = psutil.Process(api.proc.pid)
            with httpx.Client(
                base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {token}"}, timeout=30
            ) as client:
                for route in ROUTES:
                    for i in range(20):
                        _post(client, route, images[i % len(images)])
                    before = (_cpu_seconds([api_process]), _cpu_seconds(backends), _cpu_seconds([setup]))
                    latencies = [_post(client, route, images[i % len(images)]) for i in range(requests)]
                    after = (_cpu_seconds([api_process]), _cpu_seconds(backends), _cpu_seconds([setup]))
                    api_ms, postgres_ms, redis_ms = (
                        (b - a) * 1000 / requests for a, b in zip(before, after, strict=True)
                    )
                    rows.append(
                        Row(
                            route,
                            round(api_ms, 2),
                            round(postgres_ms, 2),
                            round(redis_ms, 2),
                            round(statistics.median(latencies), 2),
                        )
                    )
            return rows
        finally:
            worker.stop()
            api.stop()
            redis_service.stop()


def _answers(port: int) -> bool:
    try:
        return httpx.post(f"http://127.0.0.1:{port}/raw", content=b"", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _post(client: httpx.Client, route: str, image: tuple[str, bytes]) -> float:
    name, data = image
    started = time.perf_counter()
    response = client.post(f"/{route}", files={"file": (name, data + os.urandom(16))})
    elapsed = (time.perf_counter() - started) * 1000
    response.raise_for_status()
    return elapsed


def table(rows: list[Row]) -> str:
    """The rows as Markdown: per route, the API's CPU per request and what the step added."""
    lines = [
        "| route | API CPU ms/request | added by the step | PostgreSQL CPU ms | Redis CPU ms | client p50 ms |",
        "|---|---|---|---|---|---|",
    ]
    previous = 0.0
    for row in rows:
        lines.append(
            f"| {row.route} | {row.api_cpu_ms:.2f} | {row.api_cpu_ms - previous:+.2f} | "
            f"{row.postgres_cpu_ms:.2f} | {row.redis_cpu_ms:.2f} | {row.latency_ms:.2f} |"
        )
        previous = row.api_cpu_ms
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--photos", type=Path, default=ROOT.parent / "shared" / "data" / "photos")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    parser.add_argument("--stub-worker", metavar="REDIS_URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stub_worker:
        stub_worker(args.stub_worker)
        return
    rows = measure(requests=args.requests, photos=args.photos)
    text = table(rows)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "floor.md").write_text(
        f"# The stack's floor\n\n`python -m bench.floor --requests {args.requests}` at "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.\n\n{text}"
    )


if __name__ == "__main__":
    main()
