"""Where the API's own time per prediction goes: a sampling profile of a real run.

``python -m bench.profile [--model mobilenet_v2@1] [--requests 300]`` starts the portal as the
benchmark does (one API process, one worker, the result cache off), sends one prediction at a time
with a fresh photo each time (a photo of ``--photos`` with random bytes after its end, so no two
uploads share a hash): first ``--requests`` of them to time (and the API's CPU time per request),
then as many again while py-spy records the API process (a sampling profiler that reads the
process from outside, so the API runs unmodified: https://github.com/benfred/py-spy). It writes the raw stacks (``profile-api.txt``, one line per stack with its sample count, the
format flame graph tools read) and prints:

- the split of one request as the latency benchmark makes it (API time minus the worker's) and
  the API process's CPU time per request;
- the share of the API's busy samples under each of the portal's own functions (inclusive), and
  under the libraries doing the work (SQLAlchemy and asyncpg, redis-py, Starlette and FastAPI).

Samples in the event loop's wait for the network are idle and not counted.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
from sqlalchemy.engine import make_url

from model.quantize import PHOTO_SUFFIXES

from .e2e import EMAIL, PASSWORD, portal, psql
from .processes import cpu_ms_between, cpu_snapshot

ROOT = Path(__file__).resolve().parent.parent
IDLE = re.compile(r"^(process \d+:|(Runner\.run|Condition\.wait|Event\.wait|_worker|select|run_forever) \()")
"""Leaf frames of a thread waiting: the event loop in its selector (py-spy shows no frame below
``Runner.run`` there), a worker thread on its queue, a stack with no Python frame at all."""
FRAME = re.compile(r" \((?P<file>[^()]*?):\d+\)$")
LIBRARIES = {
    "SQLAlchemy and asyncpg": ("sqlalchemy/", "asyncpg/"),
    "redis-py": ("redis/",),
    "Starlette, FastAPI, uvicorn": ("starlette/", "fastapi/", "uvicorn/", "httptools"),
    "pydantic": ("pydantic",),
    "Pillow (image checks)": ("PIL/",),
    "python-multipart": ("multipart/",),
    "logging": ("logging/",),
}


@dataclass(frozen=True)
class Split:
    """Medians (ms) over the requests sent before the profiler attaches (it pauses the process
    to read it, which would count in these), and the API process's CPU time per request then."""

    client_ms: float
    api_ms: float
    worker_ms: float
    api_outside_worker_ms: float
    api_cpu_ms: float
    """User and system CPU time of the API process (``/proc``, through psutil) per request."""
    postgres_cpu_ms: float = 0.0
    """CPU time of the PostgreSQL backends serving the portal's database per request."""
    redis_cpu_ms: float = 0.0
    """CPU time of the portal's Redis server per request (its workers' commands included)."""


def fresh_photos(photos: Path) -> list[tuple[str, bytes]]:
    """The photos of ``photos`` (name, bytes)."""
    return [(f.name, f.read_bytes()) for f in sorted(photos.iterdir()) if f.suffix.lower() in PHOTO_SUFFIXES]


def _send(client: httpx.Client, model: str, photos: list[tuple[str, bytes]]) -> tuple[float, float, float]:
    name, data = random.choice(photos)
    # Bytes after the end of the image: decoders ignore them, the hash (and the cache key) changes.
    response = client.post("/model/predict", params={"models": model}, files={"file": (name, data + os.urandom(16))})
    response.raise_for_status()
    worker = float(response.json()["results"][model]["timings"]["total_ms"])
    api = float(response.headers["server-timing"].removeprefix("app;dur="))
    return response.elapsed.total_seconds() * 1000, api, worker


def _backends(database_url: str) -> list[int]:
    """The PostgreSQL backends connected to the database of ``database_url`` now (the API keeps
    its pool's connections open, so they serve the whole run)."""
    name = make_url(database_url).database
    return [
        int(pid) for pid in psql(database_url, f"SELECT pid FROM pg_stat_activity WHERE datname = '{name}'").split()
    ]


def run(
    *, model: str, requests: int, photos: Path, out: Path, database_url: str, rate: int = 500
) -> tuple[Split, Path]:
    """Profiles ``requests`` sequential predictions; returns their split and the stacks' file."""
    models_dir = Path(os.environ.get("MODELS_DIR", ROOT / "var" / "models"))
    images = fresh_photos(photos)
    stacks = out / "profile-api.txt"
    out.mkdir(parents=True, exist_ok=True)
    with portal(database_url, models_dir, api_workers=1) as p:
        p.start_workers(1, os.cpu_count() or 2)
        p.wait_for_models([model], 1)
        with httpx.Client(base_url=f"http://127.0.0.1:{p.port}", timeout=60) as client:
            login = client.post("/login", data={"username": EMAIL, "password": PASSWORD})
            login.raise_for_status()
            client.headers["Authorization"] = f"Bearer {login.json()['access_token']}"
            for _ in range(10):  # warm-up: connections, prepared statements, the model
                _send(client, model, images)
            api = psutil.Process(p.pids("api")[0])
            servers = (_backends(database_url), p.pids("redis"))
            before, servers_before = api.cpu_times(), [cpu_snapshot(pids) for pids in servers]
            rows = [_send(client, model, images) for _ in range(requests)]
            after, servers_after = api.cpu_times(), [cpu_snapshot(pids) for pids in servers]
            cpu_ms = (after.user + after.system - before.user - before.system) * 1000 / requests
            postgres_ms, redis_ms = (
                cpu_ms_between(b, a) / requests for b, a in zip(servers_before, servers_after, strict=True)
            )
            spy = Path(sys.executable).parent / "py-spy"
            command = [str(spy), "record", "--pid", str(p.pids("api")[0]), "--rate", str(rate)]
            recorder = subprocess.Popen(
                [*command, "--format", "raw", "--output", str(stacks), "--subprocesses"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            time.sleep(1.0)  # py-spy attaches
            for _ in range(requests):
                _send(client, model, images)
            recorder.send_signal(signal.SIGINT)
            _, err = recorder.communicate(timeout=60)
            if not stacks.exists():
                raise RuntimeError(f"py-spy wrote no profile: {err.decode(errors='replace')[-500:]}")
    split = Split(
        client_ms=round(statistics.median(r[0] for r in rows), 2),
        api_ms=round(statistics.median(r[1] for r in rows), 2),
        worker_ms=round(statistics.median(r[2] for r in rows), 2),
        api_outside_worker_ms=round(statistics.median(r[1] - r[2] for r in rows), 2),
        api_cpu_ms=round(cpu_ms, 2),
        postgres_cpu_ms=round(postgres_ms, 2),
        redis_cpu_ms=round(redis_ms, 2),
    )
    return split, stacks


def summarise(stacks: Path, top: int = 30) -> str:
    """The busy samples' shares (%) by the portal's own functions (inclusive) and by library, as
    Markdown tables, from py-spy's raw stacks (``frame;frame;... count`` per line)."""
    own: collections.Counter[str] = collections.Counter()
    libraries: collections.Counter[str] = collections.Counter()
    busy = 0
    for line in stacks.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        if IDLE.match(frames[-1]):
            continue
        n = int(count)
        busy += n
        seen: set[str] = set()
        for frame in frames:
            match = FRAME.search(frame)
            path = match["file"] if match else ""
            if path.startswith(("api/", "contracts/")) and path != "api/__main__.py":
                key = f"{frame[: match.start()] if match else frame} ({path})"
                if key not in seen:
                    own[key] += n
                    seen.add(key)
        leaf = FRAME.search(frames[-1])
        leaf_path = leaf["file"] if leaf else frames[-1]
        library = next((name for name, marks in LIBRARIES.items() if any(m in leaf_path for m in marks)), None)
        libraries[library or ("the portal's code" if leaf_path.startswith(("api/", "contracts/")) else "other")] += n
    if busy == 0:
        return "No busy samples.\n"
    lines = [f"{busy:,} busy samples.", "", "| the portal's function (and what it calls) | share |", "|---|---|"]
    lines += [f"| `{name}` | {100 * n / busy:.1f} % |" for name, n in own.most_common(top)]
    lines += ["", "| where the sampled frame was | share |", "|---|---|"]
    lines += [f"| {name} | {100 * n / busy:.1f} % |" for name, n in libraries.most_common()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenet_v2@1")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--photos", type=Path, default=ROOT.parent / "shared" / "data" / "photos")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    parser.add_argument(
        "--database-url", default="postgresql+asyncpg://postgres@127.0.0.1:5432/portal_profile", help="dropped after"
    )
    args = parser.parse_args()
    split, stacks = run(
        model=args.model, requests=args.requests, photos=args.photos, out=args.out, database_url=args.database_url
    )
    print(f"{args.requests} predictions of {args.model}, medians: {split}")
    text = summarise(stacks)
    (args.out / "profile-api.md").write_text(
        f"# Profile of the API\n\n`python -m bench.profile --model {args.model} --requests {args.requests}`; "
        f"medians (ms): {split}.\n\n{text}"
    )
    print(text)


if __name__ == "__main__":
    main()
