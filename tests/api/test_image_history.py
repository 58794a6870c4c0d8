"""An image predicted many times: its detail lists the newest jobs and counts them all, its view
writes the newest answer of each model version, and neither costs the image's whole history."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from fastapi import FastAPI
from sqlalchemy import select, text

from api.app.images import service as images_service
from api.app.images.models import Image
from api.app.predictions import service
from api.app.predictions.models import Job, Prediction
from tests.conftest import Users
from tests.images import noise_png

TOP_K = [
    {"label": "macaw", "score": 0.9},
    {"label": "lorikeet", "score": 0.05},
    {"label": "toucan", "score": 0.02},
    {"label": "jay", "score": 0.02},
    {"label": "kite", "score": 0.01},
]
"""A worker's five best labels, as it stores them."""
NEWEST = 50
"""Jobs an image's detail lists (``service.IMAGE_JOBS``)."""


async def uploaded(client: httpx.AsyncClient, headers: dict[str, str]) -> dict[str, Any]:
    r = await client.post("/v1/images", files={"file": ("x.png", noise_png())}, headers=headers)
    assert r.status_code == 201, r.text
    return dict(r.json())


async def many_jobs(app: FastAPI, *, owner_id: int, image_id: str, jobs: int, hours_ago: int = 0) -> None:
    """``jobs`` done jobs of the image, one a second back from ``hours_ago``, each with a done
    answer of mobilenet_v2@1 carrying ``TOP_K``: what thousands of cached repeats of one request leave."""
    async with app.state.sessionmaker() as session:
        await session.execute(
            text(
                "WITH new AS ("
                " INSERT INTO jobs (id, owner_id, image_id, status, request_id, deadline_at, finished_at, created_at)"
                " SELECT gen_random_uuid(), :owner_id, :image_id, 'done', 'test', now(), now(),"
                " now() - make_interval(hours => :hours_ago, secs => g) FROM generate_series(1, :jobs) g"
                " RETURNING id, created_at)"
                " INSERT INTO predictions (id, job_id, position, model_name, model_version, status, label, score,"
                " top_k, cached, random_weights, total_ms, created_at)"
                " SELECT gen_random_uuid(), new.id, 0, 'mobilenet_v2', 1, 'done', 'macaw', 0.9,"
                " CAST(:top_k AS jsonb), true, false, 1.0, new.created_at FROM new"
            ),
            {
                "owner_id": owner_id,
                "image_id": uuid.UUID(image_id),
                "jobs": jobs,
                "hours_ago": hours_ago,
                "top_k": json.dumps(TOP_K),
            },
        )
        await session.commit()


async def job(
    app: FastAPI, *, owner_id: int, image_id: str, minutes_ago: int, answers: list[tuple[str, int, str, str]]
) -> None:
    """A job of the image ``minutes_ago``, with ``answers`` (model, version, status, top label) in that order."""
    created = datetime.now(UTC) - timedelta(minutes=minutes_ago)
    row = Job(
        id=uuid.uuid4(),
        owner_id=owner_id,
        image_id=uuid.UUID(image_id),
        status="done",
        request_id="test",
        deadline_at=created,
        finished_at=created,
        created_at=created,
    )
    async with app.state.sessionmaker() as session:
        session.add(row)
        await session.flush()
        for position, (model, version, status, label) in enumerate(answers):
            session.add(
                Prediction(
                    id=uuid.uuid4(),
                    job_id=row.id,
                    position=position,
                    model_name=model,
                    model_version=version,
                    status=status,
                    label=label if status == "done" else None,
                    top_k=(
                        [{"label": label, "score": 0.75}, {"label": "other", "score": 0.125}]
                        if status == "done"
                        else []
                    ),
                    created_at=created,
                )
            )
        await session.commit()


async def test_the_detail_lists_the_newest_jobs_and_counts_them_all(
    client: httpx.AsyncClient, app: FastAPI, users: Users
) -> None:
    user, headers = await users.create()
    image = await uploaded(client, headers)
    await many_jobs(app, owner_id=user["id"], image_id=image["id"], jobs=NEWEST + 10)
    every = (
        await client.get("/v1/predictions", params={"image_id": image["id"], "limit": 200}, headers=headers)
    ).json()["data"]
    assert len(every) == NEWEST + 10

    detail = (await client.get(f"/v1/images/{image['id']}", headers=headers)).json()
    # The newest 50, as the paged list shows them; the rest follow from the cursor there.
    assert detail["jobs"] == every[:NEWEST]
    assert detail["jobs_count"] == NEWEST + 10
    assert detail["jobs"][0]["results"][0]["top_k"] == TOP_K
    rest = await client.get(
        "/v1/predictions",
        params={"image_id": image["id"], "cursor": detail["jobs_next_cursor"], "limit": 200},
        headers=headers,
    )
    assert rest.json()["data"] == every[NEWEST:] and rest.json()["next_cursor"] is None

    few = await uploaded(client, headers)
    await many_jobs(app, owner_id=user["id"], image_id=few["id"], jobs=3)
    detail = (await client.get(f"/v1/images/{few['id']}", headers=headers)).json()
    assert len(detail["jobs"]) == detail["jobs_count"] == 3 and detail["jobs_next_cursor"] is None
    fresh = await uploaded(client, headers)
    detail = (await client.get(f"/v1/images/{fresh['id']}", headers=headers)).json()
    assert (detail["jobs"], detail["jobs_count"], detail["jobs_next_cursor"]) == ([], 0, None)


async def test_the_view_writes_the_newest_answer_of_each_version(
    client: httpx.AsyncClient, app: FastAPI, users: Users
) -> None:
    user, headers = await users.create()
    image = await uploaded(client, headers)
    owner, image_id = user["id"], image["id"]
    await job(app, owner_id=owner, image_id=image_id, minutes_ago=30, answers=[("sketch", 2, "done", "cat")])
    await job(
        app,
        owner_id=owner,
        image_id=image_id,
        minutes_ago=20,
        answers=[("mobilenet_v2", 1, "done", "toucan"), ("sketch", 2, "done", "fish")],
    )
    await job(
        app,
        owner_id=owner,
        image_id=image_id,
        minutes_ago=10,
        answers=[("mobilenet_v2", 2, "done", "jay"), ("mobilenet_v2", 1, "done", "macaw")],
    )
    # The newest of all answered nothing yet, or failed: the view keeps the answers before.
    await job(
        app,
        owner_id=owner,
        image_id=image_id,
        minutes_ago=1,
        answers=[("mobilenet_v2", 1, "failed", ""), ("sketch", 2, "queued", "")],
    )
    # Older answers of the same versions, many of them, under the newest ones.
    await many_jobs(app, owner_id=owner, image_id=image_id, jobs=200, hours_ago=1)
    await job(app, owner_id=owner, image_id=image_id, minutes_ago=600, answers=[("birds", 1, "done", "kite")])

    lines = [
        "mobilenet_v2@2: jay 0.75, other 0.12",
        "mobilenet_v2@1: macaw 0.75, other 0.12",
        "sketch@2: fish 0.75, other 0.12",
        "birds@1: kite 0.75, other 0.12",
    ]
    async with app.state.sessionmaker() as session:
        assert await service.latest_answers(session=session, image_id=uuid.UUID(image_id)) == lines
        stored = await session.scalar(select(Image).where(Image.id == uuid.UUID(image_id)))
        assert stored is not None
        drawn = await images_service.render_view(
            store=app.state.store, settings=app.state.settings, image=stored, lines=lines
        )
    view = await client.get(f"/v1/images/{image_id}/view", headers=headers)
    assert view.status_code == 200 and view.headers["content-type"] == "image/png"
    assert view.content == drawn


async def best_of_three(client: httpx.AsyncClient, url: str, headers: dict[str, str]) -> tuple[float, int]:
    """The fastest of three GETs of ``url``, in seconds, and the size of its answer in bytes."""
    fastest, size = float("inf"), 0
    for _ in range(3):
        start = time.perf_counter()
        r = await client.get(url, headers=headers)
        fastest = min(fastest, time.perf_counter() - start)
        assert r.status_code == 200, r.text
        size = len(r.content)
    return fastest, size


async def test_an_image_predicted_thousands_of_times_costs_about_what_a_new_one_does(
    client: httpx.AsyncClient, app: FastAPI, users: Users
) -> None:
    """5,000 jobs of one image, as 5,000 cached repeats of one request leave them. Loading every
    job and answer as row objects, the detail took 0.85-1.2 s more than for an image of one job
    (3.3 MB) and the view 0.4-0.65 s more, on a 2-core host beside other work (load 5-6), the
    event loop busy all along; reading a page and one row per version, 4-13 ms (33 KB) and 20-35 ms."""
    user, headers = await users.create()
    small, large = await uploaded(client, headers), await uploaded(client, headers)
    await many_jobs(app, owner_id=user["id"], image_id=small["id"], jobs=1)
    await many_jobs(app, owner_id=user["id"], image_id=large["id"], jobs=5000)
    spent: dict[str, float] = {}
    sizes: dict[str, int] = {}
    for suffix in ("", "/view"):
        base, _ = await best_of_three(client, f"/v1/images/{small['id']}{suffix}", headers)
        took, sizes[suffix or "/"] = await best_of_three(client, f"/v1/images/{large['id']}{suffix}", headers)
        spent[suffix or "/"] = took - base
    assert all(extra < 0.15 for extra in spent.values()) and sizes["/"] < 100_000, (spent, sizes)


def _index_scans(plan: dict[str, Any]) -> list[tuple[str, int]]:
    """(index name, rows it gave) of every index scan in an EXPLAIN (ANALYZE, FORMAT JSON) plan."""
    found = [(plan["Index Name"], plan["Actual Rows"])] if "Index Name" in plan else []
    for child in plan.get("Plans", []):
        found += _index_scans(child)
    return found


async def test_the_detail_reads_the_newest_jobs_of_the_image_not_all_of_them(
    client: httpx.AsyncClient, app: FastAPI, users: Users
) -> None:
    """Through ix_jobs_image_id PostgreSQL read and sorted all of an image's jobs for its newest
    51 (80-170 ms for 20,000); the index in time order gives just those."""
    user, headers = await users.create()
    image = await uploaded(client, headers)
    await many_jobs(app, owner_id=user["id"], image_id=image["id"], jobs=3000)
    async with app.state.sessionmaker() as session:
        await session.execute(text("ANALYZE jobs"))
        explained = await session.scalar(
            text(f"EXPLAIN (ANALYZE, FORMAT JSON) {service._IMAGE_JOBS_PAGE.text}"),
            {"image_id": uuid.UUID(image["id"]), "skip": 0, "limit": NEWEST + 1},
        )
    plan = (explained if isinstance(explained, list) else json.loads(explained))[0]["Plan"]
    jobs_scans = [(name, rows) for name, rows in _index_scans(plan) if name.startswith("ix_jobs")]
    assert jobs_scans == [("ix_jobs_image_created", NEWEST + 1)], jobs_scans
