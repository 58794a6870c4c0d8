"""One user, one request at a time: where the milliseconds of a prediction go.

Each request's time is split with what the portal reports about it: the API's own time
(``Server-Timing``) and the worker's timings in the answer (from the moment the job was queued to
the moment its answer was computed). What is left is the API's work around the worker (reading
and storing the upload, queueing, collecting and storing the answer, waking the request, reading
the answer back) and the client and network around the API.
"""

from __future__ import annotations

import json
import logging
import random
import statistics
from dataclasses import dataclass
from pathlib import Path

import httpx

from model.quantize import PHOTO_SUFFIXES

from .e2e import EMAIL, PASSWORD, Portal

log = logging.getLogger("bench.latency")


@dataclass
class LatencyResult:
    """Medians over ``requests`` sequential predictions of one model through the HTTP API."""

    model: str
    requests: int
    client_ms: float
    """What the client waited, request sent to answer read."""
    api_ms: float
    """The API's own time for the request (Server-Timing)."""
    worker_ms: float
    """From the job being queued to its answer computed (the worker's total)."""
    queue_ms: float
    """From queued to taken by the worker."""
    preprocess_ms: float
    """Decoding and resizing the image in the worker."""
    inference_ms: float
    """The model itself."""
    api_outside_worker_ms: float
    """API time minus worker time: everything the API does before queueing and after the answer."""
    client_outside_api_ms: float
    """Client time minus API time: HTTP, the client's own work and the network."""


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 1)


def measure(p: Portal, *, model: str, requests: int, images: Path, warmup: int = 5) -> LatencyResult:
    photos = [(f.name, f.read_bytes()) for f in sorted(images.iterdir()) if f.suffix.lower() in PHOTO_SUFFIXES]
    rows: list[dict[str, float]] = []
    with httpx.Client(base_url=f"http://127.0.0.1:{p.port}", timeout=60) as client:
        login = client.post("/login", data={"username": EMAIL, "password": PASSWORD})
        login.raise_for_status()
        client.headers["Authorization"] = f"Bearer {login.json()['access_token']}"
        for i in range(warmup + requests):
            name, data = random.choice(photos)
            response = client.post("/model/predict", params={"models": model}, files={"file": (name, data)})
            response.raise_for_status()
            if i < warmup:
                continue
            timings = response.json()["results"][model]["timings"]
            api = float(response.headers["server-timing"].removeprefix("app;dur="))
            client_ms = response.elapsed.total_seconds() * 1000
            rows.append(
                {
                    "client_ms": client_ms,
                    "api_ms": api,
                    "worker_ms": timings["total_ms"],
                    "queue_ms": timings["queue_ms"],
                    "preprocess_ms": timings["preprocess_ms"],
                    "inference_ms": timings["inference_ms"],
                    "api_outside_worker_ms": api - timings["total_ms"],
                    "client_outside_api_ms": client_ms - api,
                }
            )
    result = LatencyResult(model=model, requests=len(rows), **{k: _median([r[k] for r in rows]) for k in rows[0]})
    log.info("%s", json.dumps(result.__dict__))
    return result
