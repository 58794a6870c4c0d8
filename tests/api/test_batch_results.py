"""A batch's results: JSON in pages (every row once, in the batch's order, with the count), the
whole CSV streamed as it always read, and neither holding up the process's other requests however
large the batch (its rows are inserted straight into the database: no worker runs here)."""

from __future__ import annotations

import asyncio
import base64
import csv
import hashlib
import io
import json
import time
import uuid
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text

from api.app.batches import service
from api.app.batches.models import Batch, BatchItem
from api.app.predictions.models import Job, Prediction
from contracts.keys import BATCH_REQUEST_PREFIX
from tests.conftest import Users
from tests.images import noise_png

TOP_5 = [{"label": f"label-{i}", "score": round(0.5 - i * 0.1, 2)} for i in range(5)]
COLUMNS = ["file_name", "sha256", "model", "version", "status", "label", "score", "top_5", "error"]
TOP_5_CELL = (
    '"[{""label"": ""label-0"", ""score"": 0.5}, {""label"": ""label-1"", ""score"": 0.4}, '
    '{""label"": ""label-2"", ""score"": 0.3}, {""label"": ""label-3"", ""score"": 0.2}, '
    '{""label"": ""label-4"", ""score"": 0.1}]"'
)
A, B, C = "a" * 64, "b" * 64, "c" * 64
SMALL_CSV = (
    "\r\n".join(
        [
            ",".join(COLUMNS),
            f"parrot.jpg,{A},model-0,1,done,macaw,0.875,{TOP_5_CELL},",
            f"parrot.jpg,{A},model-1,1,failed,,,[],the worker stopped",
            f"'=HYPERLINK(1).png,{C},model-0,1,done,label-0,0.5,"
            '"[{""label"": ""label-0"", ""score"": 0.5}, {""label"": ""label-1"", ""score"": 0.4}]",',
            f"'=HYPERLINK(1).png,{C},model-1,2,expired,,,[],",
            "notes.txt,,,,skipped,,,[],not an image the portal reads",
            f"gone.jpg,{B},,,deleted,,,[],its image was deleted after the batch received it",
            '"a, ""quoted"" name.zip",,,,skipped,,,[],\'=cmd|\' /C calc\'!A0 nested',
            f"again/parrot.jpg,{A},model-0,1,done,macaw,0.875,{TOP_5_CELL},",
            f"again/parrot.jpg,{A},model-1,1,failed,,,[],the worker stopped",
        ]
    )
    + "\r\n"
)
"""The small batch's CSV as the route wrote it when it built the whole file at once."""
SMALL_ORDER = [
    ("parrot.jpg", "model-0"),
    ("parrot.jpg", "model-1"),
    ("=HYPERLINK(1).png", "model-0"),
    ("=HYPERLINK(1).png", "model-1"),
    ("notes.txt", ""),
    ("gone.jpg", ""),
    ('a, "quoted" name.zip', ""),
    ("again/parrot.jpg", "model-0"),
    ("again/parrot.jpg", "model-1"),
]
LARGE_FILES, LARGE_MODELS = 3_400, 3
"""10,200 result rows: the route that built them all at once held a loaded 2-core machine's event
loop 0.7 to 1.1 s (CSV and JSON alike); read in pieces, no longer than the machine's load alone
(10 to 140 ms then, with nothing asked)."""
LONGEST_WAIT_SECONDS = 0.3
"""What a health check may wait while the results are read."""


def forged_cursor(raw: str) -> str:
    """A cursor as the API makes them (base64 of ``<batch id>|<file position>|<file id>|<model position>``),
    made here: to start deep in a batch, or to be refused."""
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def now() -> datetime:
    return datetime.now(UTC)


async def an_image(client: httpx.AsyncClient, headers: dict[str, str]) -> str:
    r = await client.post("/v1/images", files={"file": ("a.png", noise_png(7))}, headers=headers)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def answer(job_id: uuid.UUID, position: int, model: str, *, version: int = 1, **fields: Any) -> Prediction:
    """A prediction of ``model``@``version``, done unless ``fields`` say otherwise."""
    values: dict[str, Any] = {"status": "done", "top_k": [], **fields}
    return Prediction(job_id=job_id, position=position, model_name=model, model_version=version, **values)


async def small_batch(app: FastAPI, *, owner_id: int, image_id: str) -> str:
    """A finished batch of two models over six files, stored out of their order: a file answered
    by one model (the other failed), one named like a formula (one answer expired), a file
    skipped, one whose image was deleted since, one skipped with a formula for a reason, and a
    copy of the first (the same job)."""
    image = uuid.UUID(image_id)
    batch = Batch(owner_id=owner_id, status="done", models=["model-0@1", "model-1@1"], entries=6, fully_received=True)
    first = Job(owner_id=owner_id, image_id=image, status="done", deadline_at=now())
    second = Job(owner_id=owner_id, image_id=image, status="done", deadline_at=now())
    async with app.state.sessionmaker() as session:
        session.add_all([batch, first, second])
        await session.flush()
        session.add_all(
            [
                answer(first.id, 1, "model-1", status="failed", error="the worker stopped"),
                answer(first.id, 0, "model-0", label="macaw", score=0.875, top_k=TOP_5),
                answer(second.id, 0, "model-0", label="label-0", score=0.5, top_k=TOP_5[:2]),
                answer(second.id, 1, "model-1", version=2, status="expired"),
            ]
        )
        item = {"batch_id": batch.id}
        job_of = {"image_id": image}
        session.add_all(
            [
                BatchItem(position=5, file_name="again/parrot.jpg", sha256=A, job_id=first.id, **item, **job_of),
                BatchItem(position=2, file_name="notes.txt", error="not an image the portal reads", **item),
                BatchItem(position=0, file_name="parrot.jpg", sha256=A, job_id=first.id, **item, **job_of),
                BatchItem(position=3, file_name="gone.jpg", sha256=B, **item),
                BatchItem(position=1, file_name="=HYPERLINK(1).png", sha256=C, job_id=second.id, **item, **job_of),
                BatchItem(position=4, file_name='a, "quoted" name.zip', error="=cmd|' /C calc'!A0 nested", **item),
            ]
        )
        await session.commit()
    return str(batch.id)


async def large_batch(app: FastAPI, *, owner_id: int, image_id: str, files: int, models: int) -> str:
    """A finished batch of ``files`` files, each answered by ``models`` model versions, inserted
    straight into the database (thousands of rows in a fraction of a second); its id. File ``n``
    is ``photos/holiday-<n>.jpg``, its sha256 twice the MD5 of ``n``, every answer ``label-0``."""
    batch_id = uuid.uuid4()
    async with app.state.sessionmaker() as session:
        await session.execute(
            text(
                "INSERT INTO batches (id, owner_id, status, models, entries, fully_received, created_at, finished_at)"
                " VALUES (:id, :owner, 'done', CAST(:models AS jsonb), :files, true, now(), now())"
            ),
            {
                "id": batch_id,
                "owner": owner_id,
                "models": json.dumps([f"model-{m}@1" for m in range(models)]),
                "files": files,
            },
        )
        await session.execute(
            text(
                "CREATE TEMP TABLE numbered ON COMMIT DROP AS"
                " SELECT n, gen_random_uuid() AS job_id FROM generate_series(0, :files - 1) AS n"
            ),
            {"files": files},
        )
        await session.execute(
            text(
                "INSERT INTO jobs (id, owner_id, image_id, status, request_id, deadline_at, finished_at, created_at)"
                " SELECT job_id, :owner, :image, 'done', :request, now(), now(), now() FROM numbered"
            ),
            {"owner": owner_id, "image": uuid.UUID(image_id), "request": f"batch:{batch_id}"},
        )
        await session.execute(
            text(
                "INSERT INTO predictions (id, job_id, position, model_name, model_version, status, label, score,"
                " top_k, cached, random_weights, created_at, finished_at)"
                " SELECT gen_random_uuid(), job_id, m, 'model-' || m, 1, 'done', 'label-0', 0.5,"
                " CAST(:top AS jsonb), false, false, now(), now()"
                " FROM numbered CROSS JOIN generate_series(0, :models - 1) AS m"
            ),
            {"top": json.dumps(TOP_5), "models": models},
        )
        await session.execute(
            text(
                "INSERT INTO batch_items (id, batch_id, position, file_name, sha256, image_id, job_id, error)"
                " SELECT gen_random_uuid(), :batch, n, 'photos/holiday-' || n || '.jpg',"
                " md5(n::text) || md5(n::text), :image, job_id, NULL FROM numbered"
            ),
            {"batch": batch_id, "image": uuid.UUID(image_id)},
        )
        await session.commit()
    return str(batch_id)


def large_csv(files: int, models: int) -> str:
    """``large_batch``'s CSV."""
    lines = [",".join(COLUMNS)]
    for n in range(files):
        sha = hashlib.md5(str(n).encode()).hexdigest() * 2  # as large_batch made it
        lines += [f"photos/holiday-{n}.jpg,{sha},model-{m},1,done,label-0,0.5,{TOP_5_CELL}," for m in range(models)]
    return "\r\n".join(lines) + "\r\n"


async def pages(client: httpx.AsyncClient, url: str, headers: dict[str, str], **params: Any) -> list[dict[str, Any]]:
    """Every page of ``url`` from the first, following ``next_cursor``; each page's body."""
    found: list[dict[str, Any]] = []
    cursor = None
    while True:
        r = await client.get(url, params={**params, **({"cursor": cursor} if cursor else {})}, headers=headers)
        assert r.status_code == 200, r.text
        found.append(r.json())
        cursor = found[-1]["next_cursor"]
        if cursor is None:
            return found
        assert len(found) < 100, "next_cursor never ends"


async def test_pages_give_every_row_once_in_the_batchs_order(
    app: FastAPI, client: httpx.AsyncClient, users: Users
) -> None:
    me, headers = await users.create()
    url = f"/v1/batches/{await small_batch(app, owner_id=me['id'], image_id=await an_image(client, headers))}/results"
    whole = (await client.get(url, headers=headers)).json()
    assert whole["count"] == 9 and whole["next_cursor"] is None and whole["status"] == "done"
    assert [(r["file_name"], r["model"]) for r in whole["data"]] == SMALL_ORDER
    assert whole["data"][1] == {
        "file_name": "parrot.jpg",
        "sha256": A,
        "model": "model-1",
        "version": 1,
        "status": "failed",
        "label": None,
        "score": None,
        "top_5": [],
        "error": "the worker stopped",
    }
    assert whole["data"][0]["top_5"] == TOP_5 and whole["data"][0]["score"] == 0.875
    assert [(r["status"], r["error"]) for r in whole["data"][4:7]] == [
        ("skipped", "not an image the portal reads"),
        ("deleted", "its image was deleted after the batch received it"),
        ("skipped", "=cmd|' /C calc'!A0 nested"),
    ]

    # Pages of 2 cut files between their models' rows: none is lost or repeated.
    paged = await pages(client, url, headers, limit=2)
    assert [len(p["data"]) for p in paged] == [2, 2, 2, 2, 1] and {p["count"] for p in paged} == {9}
    assert [r for p in paged for r in p["data"]] == whole["data"]
    assert [r for p in await pages(client, url, headers, limit=4) for r in p["data"]] == whole["data"]

    # Only the rows in a status, paged alike, counted alike.
    failed = await pages(client, url, headers, status="failed", limit=1)
    assert [r for p in failed for r in p["data"]] == [whole["data"][1], whole["data"][8]]
    assert {p["count"] for p in failed} == {2}
    for status, rows in (("skipped", [4, 6]), ("deleted", [5]), ("expired", [3]), ("done", [0, 2, 7]), ("queued", [])):
        body = (await client.get(url, params={"status": status}, headers=headers)).json()
        assert body["data"] == [whole["data"][i] for i in rows] and body["count"] == len(rows), status

    _, stranger = await users.create()
    assert (await client.get(url, headers=stranger)).status_code == 404
    assert (await client.get(url, params={"format": "csv"}, headers=stranger)).status_code == 404


async def test_the_csv_reads_as_it_always_did(app: FastAPI, client: httpx.AsyncClient, users: Users) -> None:
    me, headers = await users.create()
    batch_id = await small_batch(app, owner_id=me["id"], image_id=await an_image(client, headers))
    r = await client.get(f"/v1/batches/{batch_id}/results", params={"format": "csv"}, headers=headers)
    assert r.status_code == 200 and r.headers["content-type"] == "text/csv; charset=utf-8"
    assert r.headers["content-disposition"] == f'attachment; filename="batch-{batch_id}.csv"'
    assert r.text == SMALL_CSV
    # ``cursor`` and ``limit`` page JSON only; ``status`` keeps its rows in the CSV too.
    params: dict[str, str | int] = {
        "format": "csv",
        "limit": 1,
        "cursor": forged_cursor(f"{uuid.uuid4()}|0|{uuid.uuid4()}|0"),
    }
    assert (await client.get(f"/v1/batches/{batch_id}/results", params=params, headers=headers)).text == SMALL_CSV
    r = await client.get(
        f"/v1/batches/{batch_id}/results", params={"format": "csv", "status": "skipped"}, headers=headers
    )
    assert [row["file_name"] for row in csv.DictReader(io.StringIO(r.text))] == ["notes.txt", 'a, "quoted" name.zip']


@pytest.mark.parametrize(
    "params",
    [
        {"limit": 0},
        {"limit": 201},
        {"limit": "many"},
        {"cursor": "not-a-cursor"},
        {"cursor": forged_cursor("1|2")},
        {"cursor": forged_cursor(f"0|{uuid.uuid4()}|0")},
        {"cursor": forged_cursor(f"{uuid.uuid4()}|-1|{uuid.uuid4()}|0")},
        {"cursor": forged_cursor(f"{uuid.uuid4()}|{2**31}|{uuid.uuid4()}|0")},
        {"cursor": forged_cursor(f"{uuid.uuid4()}|0|{uuid.uuid4()}|-2")},
        {"status": "lost"},
        {"status": "running"},
    ],
)
async def test_a_bad_page_is_422(client: httpx.AsyncClient, users: Users, params: dict[str, Any]) -> None:
    _, headers = await users.create()
    # Checked before the batch is looked for: the same answer whoever's it is.
    r = await client.get(f"/v1/batches/{uuid.uuid4()}/results", params=params, headers=headers)
    assert r.status_code == 422, r.text


async def test_a_cursor_of_another_batch_is_422(app: FastAPI, client: httpx.AsyncClient, users: Users) -> None:
    """A next_cursor pages the batch it came from: given for another batch of the same owner it
    is refused, not read as a position in that batch (rows there would be skipped unseen)."""
    me, headers = await users.create()
    image_id = await an_image(client, headers)
    first, second = [await small_batch(app, owner_id=me["id"], image_id=image_id) for _ in range(2)]
    page = (await client.get(f"/v1/batches/{first}/results", params={"limit": 2}, headers=headers)).json()
    assert page["next_cursor"]
    r = await client.get(f"/v1/batches/{second}/results", params={"cursor": page["next_cursor"]}, headers=headers)
    assert r.status_code == 422 and "another batch" in r.json()["detail"]
    r = await client.get(f"/v1/batches/{first}/results", params={"cursor": page["next_cursor"]}, headers=headers)
    assert r.status_code == 200 and r.json()["data"]


async def test_the_eta_counts_the_pace_from_when_the_batch_was_received(
    app: FastAPI, client: httpx.AsyncClient, users: Users
) -> None:
    """A batch whose upload took 48 s and whose first 6 of 400 images were answered within 2 s of
    its end: the pace is 3 images a second, not 6 in the 50 s since the batch was created (an ETA
    of over 50 minutes for what took seconds)."""
    me, headers = await users.create()
    image = uuid.UUID(await an_image(client, headers))
    started = now() - timedelta(seconds=50)
    batch = Batch(
        owner_id=me["id"],
        status="running",
        models=["model-0@1"],
        entries=400,
        fully_received=True,
        created_at=started,
    )
    async with app.state.sessionmaker() as session:
        session.add(batch)
        await session.flush()
        for n in range(400):
            answered = n < 6
            job = Job(
                owner_id=me["id"],
                image_id=image,
                status="done" if answered else "pending",
                deadline_at=now() + timedelta(days=1),
                finished_at=now() - timedelta(seconds=1) if answered else None,
                request_id=f"{BATCH_REQUEST_PREFIX}{batch.id}",
            )
            session.add(job)
            await session.flush()
            # Each job asks model-0@1, which no worker serves: the lanes of this process's APIs
            # leave these jobs pending (a job asking nothing would be queued, one at a look, ahead
            # of every later test's batch, and never answered).
            session.add(answer(job.id, 0, "model-0", status="done" if answered else "pending"))
            session.add(
                BatchItem(batch_id=batch.id, position=n, file_name=f"{n}.png", sha256=A, image_id=image, job_id=job.id)
            )
        # Received 2 s ago when counted, however long the rows took to insert.
        batch.received_at = now() - timedelta(seconds=2)
        await session.commit()
        # The service's figure: the route drops it while no worker serves the batch's model.
        counts = await service.counts(session=session, batch=batch)
        # Nothing left running for the tests after this one.
        batch.status, batch.finished_at = "cancelled", now()
        await session.commit()
    assert counts.done == 6 and counts.queued == 394, counts
    assert counts.eta_seconds is not None and 60 <= counts.eta_seconds <= 200, counts  # 394 at 3 a second: 131 s


async def longest_wait_of_health_checks(client: httpx.AsyncClient, request: Awaitable[httpx.Response]) -> float:
    """Asks for ``/health/live`` every 10 ms (in this process, on its event loop) while
    ``request`` runs: the longest a check waited past the 10 ms, in seconds."""
    waits: list[float] = []
    finished = asyncio.Event()

    async def poll() -> None:
        while not finished.is_set():
            # Due 10 ms from now: how late its answer comes is how long the loop was held.
            due = time.perf_counter() + 0.01
            await asyncio.sleep(0.01)
            r = await client.get("/health/live")
            waits.append(time.perf_counter() - due)
            assert r.status_code == 200

    poller = asyncio.create_task(poll())
    await asyncio.sleep(0.05)
    try:
        await request
    finally:
        finished.set()
        await poller
    return max(waits)


async def test_a_large_batchs_results_hold_up_no_other_request(
    app: FastAPI, client: httpx.AsyncClient, users: Users
) -> None:
    me, headers = await users.create()
    image_id = await an_image(client, headers)
    batch_id = await large_batch(app, owner_id=me["id"], image_id=image_id, files=LARGE_FILES, models=LARGE_MODELS)
    url = f"/v1/batches/{batch_id}/results"
    answers: dict[str, httpx.Response] = {}

    async def get(name: str, **params: Any) -> httpx.Response:
        # Not through the suite's client, which reads every body it gets on this loop as well.
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as plain:
            answers[name] = await plain.get(url, params=params, headers=headers)
        return answers[name]

    csv_wait = await longest_wait_of_health_checks(client, get("csv", format="csv"))
    page_wait = await longest_wait_of_health_checks(client, get("page", limit=200))
    assert csv_wait < LONGEST_WAIT_SECONDS and page_wait < LONGEST_WAIT_SECONDS, (csv_wait, page_wait)

    assert answers["csv"].status_code == 200 and answers["csv"].text == large_csv(LARGE_FILES, LARGE_MODELS)
    page = answers["page"].json()
    assert page["count"] == LARGE_FILES * LARGE_MODELS and len(page["data"]) == 200 and page["next_cursor"]
    assert [(r["file_name"], r["model"]) for r in page["data"][:4]] == [
        ("photos/holiday-0.jpg", "model-0"),
        ("photos/holiday-0.jpg", "model-1"),
        ("photos/holiday-0.jpg", "model-2"),
        ("photos/holiday-1.jpg", "model-0"),
    ]
    # A page deep into the batch is read by its key as fast.
    deep = forged_cursor(f"{batch_id}|{LARGE_FILES - 2}|{uuid.UUID(int=0)}|0")
    started = time.perf_counter()
    r = await client.get(url, params={"cursor": deep}, headers=headers)
    assert r.status_code == 200 and time.perf_counter() - started < 2
    assert [(row["file_name"], row["model"]) for row in r.json()["data"]][:2] == [
        (f"photos/holiday-{LARGE_FILES - 2}.jpg", "model-0"),
        (f"photos/holiday-{LARGE_FILES - 2}.jpg", "model-1"),
    ]
