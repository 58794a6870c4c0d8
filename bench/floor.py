"""The stack's floor: what a prediction request costs the API process when it does only what the
portal must do, with the portal's libraries and none of its code around them.

``python -m bench.floor [--requests 300]`` starts one uvicorn process (uvloop and httptools, as
``python -m api`` runs) serving the app of this module, a private redis-server, a scratch
PostgreSQL database and a stub worker (a process that answers every queued job at once, and whose
CPU is not counted). It sends the same uploads as ``python -m bench.profile`` (a shared photo with
random bytes after its end, one request at a time) to seven routes, each adding one step of a
prediction to the one before:

1. ``raw``: a bare ASGI callable reads the body and answers a few bytes of JSON;
2. ``multipart``: a FastAPI route takes the file from a multipart form (python-multipart) and
   answers a pydantic model;
3. ``checked``: + the image checked as the portal must before accepting it (``inspect_image``:
   decoded completely) and its SHA-256, in a worker thread;
4. ``kept``: + the blob written to disk (in another thread);
5. ``authed``: + a bearer token verified (python-jose, HS256) and its user read (asyncpg, one
   round trip);
6. ``stored``: + admission and the job stored in one transaction on asyncpg (BEGIN, the owner's
   row locked with the count of their unfinished jobs, INSERT, COMMIT: four round trips);
7. ``answered``: + the job and its image queued on a Redis stream (redis-py), the request waiting
   on its list (BLPOP) while a collector task reads the stub worker's answer from the results
   stream, stores it (one UPDATE) and wakes the request and acknowledges the answer (one
   pipeline).

The seventh route is the shape of ``POST /model/predict`` as the portal makes it: six round trips to
PostgreSQL and four to Redis, as the portal's own path (``bench.profile``) makes them. An eighth,
``minimal``, does the same work with the fewest round trips the rules allow: the token's user,
admission and the job's insert in one autocommitted statement (the insert happens only when the
user is active and under their cap), then the queue and the answer as in ``answered``: two round
trips to PostgreSQL. (The portal keeps admission in a transaction for its blob lock: a new upload's
blob is written between the lock and the commit.)

For each route it prints the API process's mean CPU time per request, what the route adds to the one
before, PostgreSQL's and Redis's CPU per request (the scratch database's backends; the private
server, which also serves the stub worker's commands, as the portal's Redis serves its workers'),
and the client's median latency. CPU time is read from ``/proc/<pid>/task/*/schedstat`` (the
scheduler's nanoseconds on CPU, per thread), not from the 10 ms clock ticks of ``/proc/<pid>/stat``.
Nothing the portal adds is there: no SQLAlchemy, no middleware, no metrics, logging or request
ids, one dependency. Written to ``docs/benchmarks/floor.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import statistics
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
import redis.asyncio as aioredis
from fastapi import Depends, FastAPI, File, Header, HTTPException, Request, UploadFile
from jose import jwt
from pydantic import BaseModel
from starlette.types import ASGIApp, Receive, Scope, Send

from bench.e2e import psql
from bench.processes import Service, cpu_ms_between, cpu_snapshot, start_on_free_port, start_redis
from bench.profile import fresh_photos
from contracts.imaging import inspect_image

ROOT = Path(__file__).resolve().parent.parent
ROUTES = ("raw", "multipart", "checked", "kept", "authed", "stored", "answered", "minimal")
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
MINIMAL = (
    "INSERT INTO floor_jobs (id, owner_id, sha256, status) SELECT $1, u.id, $3, 'queued' FROM floor_users u"
    " WHERE u.id = $2 AND u.is_active AND (SELECT count(*) FROM floor_jobs j"
    " WHERE j.owner_id = u.id AND j.status IN ('queued', 'running')) < 1000 RETURNING id"
)
STORE = "UPDATE floor_jobs SET status = 'done', answer = $2 WHERE id = $1 AND status <> 'done' RETURNING owner_id"


class Accepted(BaseModel):
    """What the FastAPI routes answer."""

    file_name: str
    size: int
    answer: dict[str, Any] | None = None


# --- The app (runs in the uvicorn process) -------------------------------------------------------


@dataclass
class State:
    """What the app's routes share: a pool of 4 connections, two Redis clients (one for the
    blocking waits) and the folder the blobs go to."""

    pool: asyncpg.Pool
    redis: aioredis.Redis
    blocking: aioredis.Redis
    blobs: Path


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    # No reset on release: the portal's connections (SQLAlchemy's pool) send none either, where
    # asyncpg's own pool would send four statements each time.
    # Connections are kept for the whole run, so the backends counted stay the same.
    pool = await asyncpg.create_pool(
        os.environ["FLOOR_DATABASE_URL"], min_size=4, max_size=4, reset=_no_reset, max_inactive_connection_lifetime=0
    )
    url = os.environ["FLOOR_REDIS_URL"]
    state = State(pool, aioredis.from_url(url), aioredis.from_url(url), Path(os.environ["FLOOR_BLOBS"]))
    app.state.floor = state
    collector = asyncio.create_task(_collect(state))
    yield
    collector.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await collector
    await pool.close()


async def _no_reset(connection: asyncpg.Connection) -> None:
    return None


async def _collect(state: State) -> None:
    """Stores each answer of the stub worker, then wakes its request and acknowledges it; an error
    is printed and the loop goes on (the request then answers 504, which stops the run)."""
    reader = aioredis.from_url(os.environ["FLOOR_REDIS_URL"])
    try:
        while True:
            try:
                got = cast(Read, await reader.xreadgroup(GROUP, "collector", {RESULTS: ">"}, count=64, block=1000))
                for _, entries in got or []:
                    for entry_id, fields in entries:
                        await _store_and_wake(state, entry_id, fields)
            except Exception as exc:  # a benchmark's collector reports and goes on
                print(f"collector: {exc!r}", file=sys.stderr)
                await asyncio.sleep(0.1)
    finally:
        await reader.aclose()


async def _store_and_wake(state: State, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
    job_id = fields[b"job_id"].decode()
    async with state.pool.acquire() as connection:
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


def _check(data: bytes) -> str:
    inspect_image(data, max_pixels=50_000_000, preview_size=800)
    return hashlib.sha256(data).hexdigest()


async def _checked(file: UploadFile) -> tuple[bytes, str]:
    """The upload checked and hashed in a thread, as the portal does (``inspect_upload``)."""
    data = await file.read()
    return data, await anyio.to_thread.run_sync(_check, data)


async def _kept(state: State, file: UploadFile) -> tuple[bytes, str]:
    """``_checked``, then the blob written in another thread, as the portal does (``store.put``)."""
    data, sha256 = await _checked(file)
    await anyio.to_thread.run_sync((state.blobs / sha256).write_bytes, data)
    return data, sha256


async def _store(state: State, owner_id: int, sha256: str, status: str) -> uuid.UUID:
    """Admission and the job's insert in a transaction, as the portal does them."""
    job_id = uuid.uuid4()
    async with state.pool.acquire() as connection, connection.transaction():
        in_flight = await connection.fetchval(ADMISSION, owner_id)
        if in_flight is None or in_flight >= 1000:
            raise HTTPException(status_code=429)
        await connection.execute(
            "INSERT INTO floor_jobs (id, owner_id, sha256, status) VALUES ($1, $2, $3, $4)",
            job_id,
            owner_id,
            sha256,
            status,
        )
    return job_id


async def _answer(state: State, job_id: uuid.UUID, data: bytes) -> dict[str, Any]:
    """Queues the job with its image and waits for its answer."""
    await state.redis.xadd(JOBS, {"job_id": str(job_id), "image": data})
    got = await state.blocking.blpop([f"floor:done:{job_id}"], timeout=10)
    if got is None:
        raise HTTPException(status_code=504)
    answer: dict[str, Any] = json.loads(got[1])
    return answer


def create_app() -> ASGIApp:
    """The floor's ASGI app: ``/raw`` bare, every other route through FastAPI."""
    app = FastAPI(lifespan=_lifespan)

    @app.post("/multipart")
    async def multipart(file: FileDep) -> Accepted:
        data = await file.read()
        return Accepted(file_name=file.filename or "", size=len(data))

    @app.post("/checked")
    async def checked(file: FileDep) -> Accepted:
        data, _ = await _checked(file)
        return Accepted(file_name=file.filename or "", size=len(data))

    @app.post("/kept")
    async def kept(state: StateDep, file: FileDep) -> Accepted:
        data, _ = await _kept(state, file)
        return Accepted(file_name=file.filename or "", size=len(data))

    @app.post("/authed")
    async def authed(state: StateDep, user: UserDep, file: FileDep) -> Accepted:
        data, _ = await _kept(state, file)
        return Accepted(file_name=file.filename or "", size=len(data))

    @app.post("/stored")
    async def stored(state: StateDep, user: UserDep, file: FileDep) -> Accepted:
        data, sha256 = await _kept(state, file)
        # Stored as answered already: nothing will answer it, and admission must count what the
        # portal's counts (about nothing in flight), not every job of the run.
        await _store(state, user, sha256, "done")
        return Accepted(file_name=file.filename or "", size=len(data))

    @app.post("/answered")
    async def answered(state: StateDep, user: UserDep, file: FileDep) -> Accepted:
        data, sha256 = await _kept(state, file)
        job_id = await _store(state, user, sha256, "queued")
        return Accepted(file_name=file.filename or "", size=len(data), answer=await _answer(state, job_id, data))

    @app.post("/minimal")
    async def minimal(state: StateDep, authorization: Annotated[str, Header()], file: FileDep) -> Accepted:
        claims = jwt.decode(authorization.removeprefix("Bearer "), SECRET, algorithms=["HS256"])
        data, sha256 = await _kept(state, file)
        async with state.pool.acquire() as connection:
            job_id = await connection.fetchval(MINIMAL, uuid.uuid4(), int(claims["sub"]), sha256)
        if job_id is None:
            raise HTTPException(status_code=429)
        return Accepted(file_name=file.filename or "", size=len(data), answer=await _answer(state, job_id, data))

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
    """One route's figures: mean CPU milliseconds per request of the API process, PostgreSQL's
    backends and the Redis server, and the client's median latency in milliseconds."""

    route: str
    api_cpu_ms: float
    postgres_cpu_ms: float
    redis_cpu_ms: float
    latency_ms: float


def _psql(server: str, sql: str, database: str = "postgres") -> str:
    """Runs ``sql`` on ``server`` (a ``postgresql://`` URL without a database); its output.
    Raises ``subprocess.CalledProcessError`` if it fails."""
    return psql(server, sql, database=database, check=True)


@contextmanager
def _database(server: str) -> Iterator[str]:
    """A scratch database with the floor's tables on ``server``; its name. Dropped on exit."""
    name = f"portal_floor_{os.getpid()}"
    _psql(server, f'CREATE DATABASE "{name}"')
    try:
        for statement in SCHEMA.strip().split(";\n"):
            _psql(server, statement, name)
        yield name
    finally:
        _psql(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def measure(*, requests: int, photos: Path, server: str = "postgresql://postgres@127.0.0.1:5432") -> list[Row]:
    """Sends ``requests`` uploads (after 20 for warm-up) to each route, the routes taking turns;
    one Row per route: the mean CPU time per request of each part (read around each request: the
    answer's collection happens while the request waits for it) and the median latency.
    ``server``: the PostgreSQL server the scratch database goes on (``postgresql://`` URL)."""
    import redis as sync_redis

    images = fresh_photos(photos)
    with contextlib.ExitStack() as stack:
        workdir = Path(tempfile.mkdtemp(prefix="portal-floor-"))
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        blobs = workdir / "blobs"
        blobs.mkdir()
        database = stack.enter_context(_database(server))
        redis_ports: list[int] = []

        def start_redis_here(port: int) -> Service:
            redis_ports.append(port)
            return start_redis(port, log_dir=workdir, cwd=ROOT)

        redis_service = start_on_free_port(start_redis_here)
        stack.callback(redis_service.stop)
        redis_url = f"redis://127.0.0.1:{redis_ports[-1]}/0"
        with sync_redis.Redis.from_url(redis_url) as client:
            client.xgroup_create(JOBS, GROUP, id="0", mkstream=True)
            client.xgroup_create(RESULTS, GROUP, id="0", mkstream=True)
        env = {
            **os.environ,
            "FLOOR_DATABASE_URL": f"{server}/{database}",
            "FLOOR_REDIS_URL": redis_url,
            "FLOOR_BLOBS": str(blobs),
            "PYTHONPATH": str(ROOT),
        }
        # Started before the API, so stopped after it (the stack unwinds in reverse): a request in
        # flight when the run is stopped still gets its answer instead of waiting out its 10 s.
        worker = Service(
            "floor-worker",
            [sys.executable, "-m", "bench.floor", "--stub-worker", redis_url],
            env,
            log_dir=workdir,
            cwd=ROOT,
        ).start()
        stack.callback(worker.stop)
        api_ports: list[int] = []

        def start_api(port: int) -> Service:
            api_ports.append(port)
            args = [sys.executable, "-m", "uvicorn", "bench.floor:create_app", "--factory", "--port", str(port)]
            return Service("floor-api", [*args, *UVICORN], env, log_dir=workdir, cwd=ROOT).start(
                lambda: _answers(port), timeout=60
            )

        api = start_on_free_port(start_api)
        stack.callback(api.stop)
        backends = [
            int(pid) for pid in _psql(server, f"SELECT pid FROM pg_stat_activity WHERE datname = '{database}'").split()
        ]
        parts = ([api.proc.pid], backends, [redis_service.proc.pid])
        token = jwt.encode({"sub": "1", "exp": int(time.time()) + 3600}, SECRET, algorithm="HS256")
        samples: dict[str, list[tuple[float, float, float, float]]] = {route: [] for route in ROUTES}
        with (
            httpx.Client(
                base_url=f"http://127.0.0.1:{api_ports[-1]}", headers={"Authorization": f"Bearer {token}"}, timeout=30
            ) as client,
            _saying_why(api),
        ):
            for route in ROUTES:
                for i in range(20):
                    _post(client, route, images[i % len(images)])
            # The routes take turns, request by request, so that the host's drift (which on these
            # machines moves a run by a tenth within minutes) falls on all of them alike.
            for i in range(requests):
                for route in ROUTES:
                    before = [cpu_snapshot(pids) for pids in parts]
                    latency = _post(client, route, images[i % len(images)])
                    after = [cpu_snapshot(pids) for pids in parts]
                    api_ms, postgres_ms, redis_ms = (cpu_ms_between(b, a) for b, a in zip(before, after, strict=True))
                    samples[route].append((api_ms, postgres_ms, redis_ms, latency))
        rows: list[Row] = []
        for route in ROUTES:
            api_cpu, postgres_cpu, redis_cpu, latencies = (list(column) for column in zip(*samples[route], strict=True))
            rows.append(
                Row(
                    route,
                    round(statistics.fmean(api_cpu), 2),
                    round(statistics.fmean(postgres_cpu), 2),
                    round(statistics.fmean(redis_cpu), 2),
                    round(statistics.median(latencies), 2),
                )
            )
        return rows
    raise AssertionError("unreachable")


@contextmanager
def _saying_why(api: Service) -> Iterator[None]:
    """A route's error answer raised with the end of the floor API's log (its traceback): the
    log's folder goes with the run."""
    try:
        yield
    except httpx.HTTPStatusError as exc:
        exc.add_note(f"floor-api's log ends:\n{api.log()[-3000:]}")
        raise


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
    """The rows as Markdown: per route, the CPU per request of each part, what a step added to the
    API's (``minimal`` is set against ``answered``, the same work in fewer round trips) and the
    sum of the three parts, which is what the portal's target counts."""
    lines = [
        "| route | API CPU ms/request | added by the step | PostgreSQL CPU ms | Redis CPU ms | the three | client p50 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    by_route = {row.route: row for row in rows}
    previous = 0.0
    for row in rows:
        if row.route == "minimal" and "answered" in by_route:
            added = f"{row.api_cpu_ms - by_route['answered'].api_cpu_ms:+.2f} against answered"
        else:
            added = f"{row.api_cpu_ms - previous:+.2f}"
        total = row.api_cpu_ms + row.postgres_cpu_ms + row.redis_cpu_ms
        lines.append(
            f"| {row.route} | {row.api_cpu_ms:.2f} | {added} | {row.postgres_cpu_ms:.2f} | "
            f"{row.redis_cpu_ms:.2f} | {total:.2f} | {row.latency_ms:.2f} |"
        )
        previous = row.api_cpu_ms
    return "\n".join(lines) + "\n"


def _machine() -> str:
    """The CPU's model name and the number of cores this process may use."""
    names = [
        line.split(":", 1)[1].strip()
        for line in Path("/proc/cpuinfo").read_text().splitlines()
        if line.startswith("model name")
    ]
    return f"{names[0] if names else 'unknown CPU'}, {len(os.sched_getaffinity(0))} cores"


def _stop(signum: int, frame: object) -> None:
    # Ignored from now on: a second signal must not cut the clean-up short (a database not
    # dropped, a server not stopped).
    for ignored in (signal.SIGTERM, signal.SIGINT):
        signal.signal(ignored, signal.SIG_IGN)
    sys.exit(128 + signum)


def main() -> None:
    """``python -m bench.floor``: measures, prints the table and writes it to ``--out``/floor.md."""
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--photos", type=Path, default=ROOT.parent / "shared" / "data" / "photos")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    parser.add_argument(
        "--server", default="postgresql://postgres@127.0.0.1:5432", help="PostgreSQL server for a scratch database"
    )
    parser.add_argument("--stub-worker", metavar="REDIS_URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stub_worker:
        stub_worker(args.stub_worker)
        return
    # SIGTERM or Ctrl-C: the servers stop and the scratch database is dropped, once.
    for stopping in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stopping, _stop)
    rows = measure(requests=args.requests, photos=args.photos, server=args.server)
    text = table(rows)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "floor.md").write_text(
        f"# The stack's floor\n\n`python -m bench.floor --requests {args.requests}` at "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {_machine()}.\n\n{text}"
    )


if __name__ == "__main__":
    main()
