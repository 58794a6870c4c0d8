"""Prediction jobs end to end with a real model worker: models, results, cache, limits, feedback."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from PIL import Image
from sqlalchemy import event, select, text, update

from api.app.core.config import Settings
from api.app.images import service as images_service
from api.app.main import create_app
from api.app.predictions import service
from api.app.predictions.models import Job, Prediction
from api.app.stats.models import CorrectionStats
from contracts.messages import LabelScore, PredictionStatus, ResultMessage, Timings
from tests.api.conftest import done_answer, stored_job, waited
from tests.conftest import Users, client_for
from tests.images import encode, noise_png
from tests.support import PHOTOS, blob_lock, waiting_on_lock

pytestmark = pytest.mark.usefixtures("worker")


async def upload(client: httpx.AsyncClient, headers: dict[str, str], data: bytes) -> dict[str, Any]:
    r = await client.post("/v1/images", files={"file": ("img", data)}, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()


async def wait_job(
    client: httpx.AsyncClient, headers: dict[str, str], job_id: str, within: float = 60
) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        r = await client.get(f"/v1/predictions/{job_id}", headers=headers)
        assert r.status_code == 200, r.text
        body = r.json()
        if body["status"] in ("done", "failed", "expired"):
            return body
        assert asyncio.get_running_loop().time() < deadline, body
        await asyncio.sleep(0.1)


async def predict(
    client: httpx.AsyncClient, headers: dict[str, str], image_id: str, models: list[str] | None = None
) -> dict[str, Any]:
    payload: dict[str, Any] = {"image_id": image_id}
    if models is not None:
        payload["models"] = models
    r = await client.post("/v1/predictions", json=payload, headers=headers)
    assert r.status_code == 202, r.text
    assert r.json()["status"] in ("queued", "done")
    return await wait_job(client, headers, r.json()["job_id"])


async def test_default_model_answers_with_real_labels(client: httpx.AsyncClient, users: Users) -> None:
    _, headers = await users.create()
    image = await upload(client, headers, (PHOTOS / "parrot.jpg").read_bytes())
    job = await predict(client, headers, image["id"])
    assert job["status"] == "done"
    (result,) = job["results"]
    # ResNet50 has no weights here, so the next model of the default order answers, and says so.
    assert (result["model"], result["version"]) == ("mobilenet_v2", 1)
    assert result["label"] == "macaw" and len(result["top_k"]) == 5
    assert result["top_k"][0] == {"label": "macaw", "score": result["score"]}
    timings = result["timings"]
    assert timings["inference_ms"] > 0 and timings["total_ms"] >= timings["queue_ms"] >= 0
    assert timings["batch_size"] >= 1 and not result["random_weights"]
    detail = (await client.get(f"/v1/images/{image['id']}", headers=headers)).json()
    assert detail["jobs"][0]["results"][0]["label"] == "macaw"


async def test_unknown_and_unavailable_models_are_422(client: httpx.AsyncClient, users: Users) -> None:
    _, headers = await users.create()
    image = await upload(client, headers, noise_png())
    r = await client.post("/v1/predictions", json={"image_id": image["id"], "models": ["vgg99"]}, headers=headers)
    assert r.status_code == 422 and "mobilenet_v2@1" in r.json()["detail"] and "sketch@2" in r.json()["detail"]
    # Only what can answer now is offered: not resnet50@1 (no weights here), nor a benchmark model.
    assert "resnet50" not in r.json()["detail"], r.text
    r = await client.post("/v1/predictions", json={"image_id": image["id"], "models": ["sketch@9"]}, headers=headers)
    assert r.status_code == 422
    r = await client.post("/v1/predictions", json={"image_id": image["id"], "models": ["resnet50"]}, headers=headers)
    assert r.status_code == 422 and "unavailable" in r.json()["detail"] and "not installed" in r.json()["detail"]
    assert "/" not in r.json()["detail"], "a server path reached a user"
    r = await client.post(
        "/v1/predictions", json={"image_id": image["id"], "models": ["resnet50_random"]}, headers=headers
    )
    assert r.status_code == 422


async def test_models_listing(client: httpx.AsyncClient, users: Users, admin_headers: dict[str, str]) -> None:
    _, headers = await users.create()
    body = (await client.get("/v1/models", headers=headers)).json()
    models = {m["ref"]: m for m in body["data"]}
    assert "resnet50_random@1" not in models
    assert body["default"] == "mobilenet_v2@1"
    resnet = models["resnet50@1"]
    assert not resnet["available"] and resnet["workers"] == 0
    # Users read plain words; the worker's paths and errors are for admins.
    assert resnet["reason"] == "its model files are not installed on this server"
    for_admins = {m["ref"]: m for m in (await client.get("/v1/models", headers=admin_headers)).json()["data"]}
    assert "not found" in for_admins["resnet50@1"]["reason"] and "/" in for_admins["resnet50@1"]["reason"]
    mobilenet = models["mobilenet_v2@1"]
    assert mobilenet["available"] and mobilenet["workers"] == 1 and mobilenet["num_classes"] == 1000
    assert mobilenet["precision"] == "fp32" and models["mobilenet_v2@2"]["precision"] == "int8"
    assert mobilenet["labels"][88] == "macaw" and mobilenet["input"] == {"height": 224, "width": 224, "mode": "RGB"}
    assert models["sketch@3"]["channel"] == "stable" and models["sketch@1"]["channel"] == "canary"
    assert models["sketch@1"]["labels"] == ["apple", "bicycle", "cat", "diamond", "eye", "fish"]
    assert len(models["sketch@3"]["labels"]) == 20 and "airplane" in models["sketch@3"]["labels"]
    assert models["birds@1"]["num_classes"] == 965
    # Grad-CAM needs a Keras graph: the INT8 version's is its FP32 twin's; a TFLite file has none.
    assert mobilenet["explainable"] and models["mobilenet_v2@2"]["explainable"] and models["sketch@3"]["explainable"]
    assert not models["birds@1"]["explainable"]
    # People read a name, not a reference.
    assert (
        mobilenet["display_name"] == "MobileNetV2" and models["sketch@3"]["display_name"] == "Sketch CNN, 20 categories"
    )
    lean = (await client.get("/v1/models", params={"labels": False}, headers=headers)).json()
    assert all(m["labels"] is None for m in lean["data"])


async def test_classic_predict(client: httpx.AsyncClient, users: Users) -> None:
    _, headers = await users.create()
    data = (PHOTOS / "cat.bmp").read_bytes()
    r = await client.post("/model/predict", files={"file": ("cat.bmp", data)}, headers=headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["success"] is True and body["prediction"] in {"Egyptian_cat", "tabby", "tiger_cat"}
    assert body["score"] == round(body["score"], 4) and 0 < body["score"] <= 1
    assert body["image_file_name"].endswith(".bmp") and len(body["image_file_name"]) == 64 + 4
    assert (body["model"], body["version"]) == ("mobilenet_v2", 1)
    assert list(body["results"]) == ["mobilenet_v2@1"]


async def test_several_models_side_by_side_and_cache(client: httpx.AsyncClient, users: Users) -> None:
    _, headers = await users.create()
    image = await upload(client, headers, (PHOTOS / "bird.bmp").read_bytes())
    job = await predict(client, headers, image["id"], ["mobilenet_v2", "sketch@1", "sketch@2", "birds"])
    assert job["status"] == "done"
    got = {(r["model"], r["version"]): r for r in job["results"]}
    assert list(got) == [("mobilenet_v2", 1), ("sketch", 1), ("sketch", 2), ("birds", 1)]
    assert all(r["status"] == "done" and len(r["top_k"]) == 5 for r in got.values())
    assert got[("birds", 1)]["label"] == "Poecile atricapillus (Black-capped Chickadee)"
    assert got[("mobilenet_v2", 1)]["label"] == "chickadee"
    again = await predict(client, headers, image["id"], ["mobilenet_v2", "sketch@2"])
    assert again["status"] == "done" and all(r["cached"] for r in again["results"])
    assert again["results"][0]["top_k"] == got[("mobilenet_v2", 1)]["top_k"]
    # Another user sending the same bytes is computed afresh: an instant cached answer would tell
    # them that someone else had sent this image.
    _, stranger = await users.create()
    theirs = await upload(client, stranger, (PHOTOS / "bird.bmp").read_bytes())
    fresh = await predict(client, stranger, theirs["id"], ["mobilenet_v2"])
    assert fresh["status"] == "done" and [r["cached"] for r in fresh["results"]] == [False]
    assert fresh["results"][0]["timings"]["inference_ms"] is not None
    assert fresh["results"][0]["label"] == "chickadee"


async def test_jobs_listed_by_image(client: httpx.AsyncClient, users: Users) -> None:
    _, owner = await users.create()
    _, other = await users.create()
    first, second, unpredicted = [await upload(client, owner, noise_png()) for _ in range(3)]
    jobs = [await predict(client, owner, image["id"], ["sketch@1"]) for image in (first, first, second)]
    theirs = await upload(client, other, noise_png())
    await predict(client, other, theirs["id"], ["sketch@1"])

    def listed(ids: list[str]) -> Any:
        return client.get("/v1/predictions", params={"image_id": ids, "total": True}, headers=owner)

    body = (await listed([first["id"], unpredicted["id"], theirs["id"]])).json()
    assert body["count"] == 2 and [j["job_id"] for j in body["data"]] == [jobs[1]["job_id"], jobs[0]["job_id"]]
    body = (await listed([first["id"], second["id"]])).json()
    assert body["count"] == 3 and {j["image_id"] for j in body["data"]} == {first["id"], second["id"]}
    assert (await listed([unpredicted["id"]])).json() == {"data": [], "count": 0, "next_cursor": None}
    assert (await client.get("/v1/predictions", params={"total": True}, headers=owner)).json()["count"] == 3


async def test_other_users_predictions_are_404(client: httpx.AsyncClient, users: Users) -> None:
    _, owner = await users.create()
    _, intruder = await users.create()
    image = await upload(client, owner, noise_png())
    job = await predict(client, owner, image["id"], ["sketch@1"])
    assert (await client.get(f"/v1/predictions/{job['job_id']}", headers=intruder)).status_code == 404
    assert (await client.get("/v1/predictions", params={"total": True}, headers=intruder)).json()["count"] == 0
    assert (await client.get("/v1/predictions", params={"total": True}, headers=owner)).json()["count"] == 1
    assert (await client.get(f"/v1/predictions/{uuid.uuid4()}", headers=owner)).status_code == 404
    r = await client.post(
        "/v1/feedback", json={"prediction_id": job["results"][0]["id"], "is_correct": True}, headers=intruder
    )
    assert r.status_code == 404


async def test_feedback(client: httpx.AsyncClient, app: Any, users: Users, admin_headers: dict[str, str]) -> None:
    _, headers = await users.create()
    _, other = await users.create()
    image = await upload(client, headers, (PHOTOS / "parrot.jpg").read_bytes())
    job = await predict(client, headers, image["id"], ["mobilenet_v2"])
    prediction_id = job["results"][0]["id"]
    wrong = await client.post(
        "/v1/feedback",
        json={"prediction_id": prediction_id, "is_correct": False, "correct_label": "lorikeet", "comment": "close"},
        headers=headers,
    )
    assert wrong.status_code == 201, wrong.text
    assert wrong.json()["correct_label"] == "lorikeet" and wrong.json()["predicted_class"] == "macaw"
    assert wrong.json()["model"] == "mobilenet_v2@1"  # as the listing says
    contradictory = await client.post(
        "/v1/feedback",
        json={"prediction_id": prediction_id, "is_correct": True, "correct_label": "lorikeet"},
        headers=headers,
    )
    assert contradictory.status_code == 422 and "is_correct=false" in contradictory.json()["detail"]
    bad = await client.post(
        "/v1/feedback",
        json={"prediction_id": prediction_id, "is_correct": False, "correct_label": "unicorn"},
        headers=headers,
    )
    assert bad.status_code == 422 and "unicorn" in bad.json()["detail"]
    same = await client.post(
        "/v1/feedback",
        json={"prediction_id": prediction_id, "is_correct": False, "correct_label": "macaw"},
        headers=headers,
    )
    assert same.status_code == 422 and "different label" in same.json()["detail"]
    right = await client.post(
        "/v1/feedback", json={"prediction_id": prediction_id, "is_correct": True}, headers=headers
    )
    assert right.json()["correct_label"] == "macaw"
    # The same person's second verdict on it replaced the first: one verdict, counted once.
    assert right.json()["id"] == wrong.json()["id"] and right.json()["comment"] is None

    classic = await client.post(
        "/feedback/",
        json={
            "score": 0.9243,
            "predicted_class": "macaw",
            "image_file_name": f"{image['sha256']}.jpeg",
            "feedback": "ok",
        },
        headers=headers,
    )
    assert classic.status_code == 201 and classic.json()["prediction_id"] == prediction_id

    mine = (await client.get("/feedback/", headers=headers)).json()
    assert len(mine) == 2 and all(f["prediction_id"] == prediction_id for f in mine)
    assert sorted(str(f["is_correct"]) for f in mine) == ["None", "True"]
    assert (await client.get("/v1/feedback", params={"total": True}, headers=other)).json()["count"] == 0
    # Only the verdicts on the predictions asked for (a history page asks for its own).
    only = (await client.get("/v1/feedback", params={"prediction_id": [prediction_id]}, headers=headers)).json()
    assert {f["prediction_id"] for f in only["data"]} == {prediction_id} and len(only["data"]) == 2
    none = await client.get("/v1/feedback", params={"prediction_id": [str(uuid.uuid4())]}, headers=headers)
    assert none.status_code == 200 and none.json()["data"] == []
    assert (await client.get("/v1/feedback", params={"all_users": True}, headers=other)).status_code == 403
    # Another person's verdict on their own parrot counts apart from the first person's.
    theirs = await predict(
        client, other, (await upload(client, other, (PHOTOS / "parrot.jpg").read_bytes()))["id"], ["mobilenet_v2"]
    )
    r = await client.post(
        "/v1/feedback",
        json={"prediction_id": theirs["results"][0]["id"], "is_correct": False, "correct_label": "lorikeet"},
        headers=other,
    )
    assert r.status_code == 201
    everyone = (
        await client.get("/v1/feedback", params={"all_users": True, "total": True}, headers=admin_headers)
    ).json()
    assert everyone["count"] >= 3

    assert (await client.get("/v1/admin/stats", headers=headers)).status_code == 403
    stats = (await client.get("/v1/admin/stats", headers=admin_headers)).json()
    accuracy = {(a["model"], a["version"]): a for a in stats["accuracy"]}[("mobilenet_v2", 1)]
    assert accuracy["feedback"] >= 2 and 0 < accuracy["accuracy"] < 1
    # The suite's database holds other tests' corrections too: the pair is listed, or ten pairs
    # corrected at least as often as it are, in order.
    counts = [c["count"] for c in stats["most_corrected"]]
    assert counts == sorted(counts, reverse=True), counts
    async with app.state.read_sessionmaker() as session:
        pair = await session.scalar(
            select(CorrectionStats.verdicts).where(
                CorrectionStats.model_name == "mobilenet_v2",
                CorrectionStats.model_version == 1,
                CorrectionStats.predicted_label == "macaw",
                CorrectionStats.correct_label == "lorikeet",
            )
        )
    assert pair is not None and pair >= 1
    listed = any(
        (c["model"], c["predicted"], c["corrected_to"]) == ("mobilenet_v2", "macaw", "lorikeet")
        for c in stats["most_corrected"]
    )
    assert listed or (len(counts) == 10 and counts[-1] >= pair), (pair, stats["most_corrected"])
    assert any(d["model"] == "mobilenet_v2" and d["predictions"] >= 1 for d in stats["predictions_per_day"])
    latency = {(x["model"], x["version"]): x for x in stats["latency"]}[("mobilenet_v2", 1)]
    assert latency["count"] >= 1 and latency["p50_ms"] > 0
    assert "mobilenet_v2@1" in stats["queue_depth"] and stats["live_workers"] >= 1


async def test_image_view_draws_predictions(client: httpx.AsyncClient, users: Users) -> None:
    _, headers = await users.create()
    image = await upload(client, headers, (PHOTOS / "parrot.jpg").read_bytes())
    await predict(client, headers, image["id"], ["mobilenet_v2"])
    view = await client.get(f"/v1/images/{image['id']}/view", headers=headers)
    png = Image.open(io.BytesIO(view.content))
    assert png.format == "PNG" and png.height > image["height"] * png.width / image["width"]


async def test_admission_limits(settings: Settings, users: Users, client: httpx.AsyncClient) -> None:
    _, headers = await users.create()
    image = await upload(client, headers, noise_png())
    full_queue = create_app(settings.model_copy(update={"max_queue_depth": 0}))
    async for c in client_for(full_queue):
        r = await c.post("/v1/predictions", json={"image_id": image["id"], "models": ["sketch@1"]}, headers=headers)
        assert r.status_code == 503 and int(r.headers["retry-after"]) > 0 and "full" in r.json()["detail"]
    capped = create_app(settings.model_copy(update={"max_jobs_in_flight_per_user": 0}))
    async for c in client_for(capped):
        r = await c.post("/v1/predictions", json={"image_id": image["id"], "models": ["sketch@1"]}, headers=headers)
        assert r.status_code == 429 and "retry-after" in r.headers
    async for c in client_for(full_queue):
        # The one-call route checks admission before it stores anything: a rejected upload leaves
        # no image behind in the user's history.
        r = await c.post("/model/predict?models=sketch@1", files={"file": ("x.png", noise_png())}, headers=headers)
        assert r.status_code == 503 and "retry-after" in r.headers
        listed = await c.get("/v1/images", headers=headers)
        assert [i["id"] for i in listed.json()["data"]] == [image["id"]]


async def test_answers_for_one_job_complete_it_once(app: Any, users: Users, client: httpx.AsyncClient) -> None:
    """Two models' answers stored at the same moment (as by two API processes), plus a duplicate
    delivery of one: each answer is stored once and exactly one of them finishes the job."""
    user, headers = await users.create()
    image = await upload(client, headers, noise_png())
    jobs = [
        Job(
            id=uuid.uuid4(),
            owner_id=user["id"],
            image_id=uuid.UUID(image["id"]),
            status="queued",
            deadline_at=datetime.now(UTC) + timedelta(minutes=5),
        )
        for _ in range(20)
    ]
    predictions = [
        Prediction(id=uuid.uuid4(), job_id=job.id, position=i, model_name=f"m{i}", model_version=1, status="queued")
        for job in jobs
        for i in range(2)
    ]
    async with app.state.sessionmaker() as session:
        session.add_all(jobs)
        await session.flush()
        session.add_all(predictions)
        await session.commit()
    answers = [done_answer(p.job_id, p.id, f"label{p.position}", model=p.model_name) for p in predictions]

    async def store(answer: ResultMessage) -> service.StoredResult:
        async with app.state.sessionmaker() as session:
            return await service.store_result(session=session, result=answer)

    outcomes = await asyncio.gather(*(store(a) for a in answers + answers[::2]))
    assert [owner_id is not None for owner_id, _ in outcomes].count(True) == 2 * len(jobs)
    job_of = {p.id: p.job_id for p in predictions}
    finished = [service.answers_from_payload(payload) or [] for _, payload in outcomes if payload is not None]
    # Each job is finished once, by an answer that hands on both of its answers.
    assert sorted(job_of[found[0].id] for found in finished) == sorted(job.id for job in jobs)
    assert all([(p.label, p.status) for p in found] == [("label0", "done"), ("label1", "done")] for found in finished)
    for job in jobs:
        body = (await client.get(f"/v1/predictions/{job.id}", headers=headers)).json()
        assert body["status"] == "done" and body["finished_at"] is not None
        assert [(p["label"], p["status"]) for p in body["results"]] == [("label0", "done"), ("label1", "done")]


async def test_an_answer_is_stored_in_one_statement_and_hands_on_the_stored_job(
    app: Any, users: Users, client: httpx.AsyncClient
) -> None:
    """Each answer is one statement (the function ``store_answer``), run without a transaction
    around it; the answers handed to the waiting request are what the job then reads."""
    user, headers = await users.create()
    image = await upload(client, headers, noise_png())
    job = Job(
        id=uuid.uuid4(),
        owner_id=user["id"],
        image_id=uuid.UUID(image["id"]),
        status="queued",
        deadline_at=datetime.now(UTC) + timedelta(minutes=5),
    )
    predictions = [
        Prediction(id=uuid.uuid4(), job_id=job.id, position=i, model_name=f"m{i}", model_version=i + 1, status="queued")
        for i in range(2)
    ]
    async with app.state.sessionmaker() as session:
        session.add(job)
        await session.flush()
        session.add_all(predictions)
        await session.commit()
    answers = [
        ResultMessage(
            job_id=str(job.id),
            prediction_id=str(p.id),
            model=p.model_name,
            version=p.model_version,
            status=PredictionStatus.done if p.position == 0 else PredictionStatus.failed,
            top_k=[LabelScore(label="macaw", score=0.1 + 0.2), LabelScore(label="kite", score=1 / 3)][: 2 - p.position],
            error=None if p.position == 0 else "the image could not be decoded",
            worker_id="w1",
            timings=Timings(queue_ms=1.5, preprocess_ms=2.25, inference_ms=7.125, total_ms=10.875, batch_size=3),
        )
        for p in predictions
    ]
    statements: list[str] = []

    def on_execute(conn: object, cursor: object, statement: str, params: object, context: Any, many: bool) -> None:
        statements.append(statement)

    engine = app.state.engine.sync_engine
    event.listen(engine, "after_cursor_execute", on_execute)
    try:
        stored = []
        for answer in answers:
            async with app.state.read_sessionmaker() as session:
                stored.append(await service.store_result(session=session, result=answer))
    finally:
        event.remove(engine, "after_cursor_execute", on_execute)
    assert len(statements) == 2 and all("store_answer(" in s for s in statements), statements
    assert stored[0] == (user["id"], None)  # the job still waits for its second model
    owner_id, payload = stored[1]
    assert owner_id == user["id"] and payload is not None
    body = (await client.get(f"/v1/predictions/{job.id}", headers=headers)).json()
    assert body["status"] == "done"
    handed = service.answers_from_payload(payload)
    assert handed is not None and [a.model_dump(mode="json") for a in handed] == body["results"]
    assert body["results"][0]["score"] == 0.1 + 0.2 and body["results"][0]["timings"]["inference_ms"] == 7.125
    assert body["results"][1]["error"] == "the image could not be decoded"
    # A duplicate delivery changes nothing and completes nothing.
    async with app.state.read_sessionmaker() as session:
        assert await service.store_result(session=session, result=answers[1]) == (None, None)


async def test_an_answer_faster_than_the_lanes_commit_is_stored(
    app: Any, users: Users, client: httpx.AsyncClient
) -> None:
    """The batch lane queues a job before it commits the job as queued: an answer arriving in
    between waits for that commit, then is stored (it used to be dropped, stalling the batch)."""
    user, headers = await users.create()
    image = await upload(client, headers, noise_png())
    job, prediction = await stored_job(app, owner_id=user["id"], image_id=image["id"], status="pending")
    answer = done_answer(job.id, prediction.id)

    async def store() -> service.StoredResult:
        async with app.state.sessionmaker() as session:
            return await service.store_result(session=session, result=answer)

    async with app.state.sessionmaker() as lane:
        # What lane.top_up does: lock the pending job, mark it queued, (enqueue,) commit.
        await lane.execute(select(Job).where(Job.id == job.id).with_for_update())
        await lane.execute(update(Job).where(Job.id == job.id).values(status="queued"))
        await lane.execute(update(Prediction).where(Prediction.id == prediction.id).values(status="queued"))
        stored = asyncio.create_task(store())
        await asyncio.sleep(0.5)  # the answer is waiting for the job's lock
        assert not stored.done()
        await lane.commit()
    owner_id, payload = await asyncio.wait_for(stored, 10)
    assert owner_id == user["id"] and payload is not None
    body = (await client.get(f"/v1/predictions/{job.id}", headers=headers)).json()
    assert body["status"] == "done" and [(p["label"], p["status"]) for p in body["results"]] == [("macaw", "done")]


async def test_in_flight_count_reads_only_jobs_in_flight(app: Any, users: Users, client: httpx.AsyncClient) -> None:
    """The admission count stays as cheap as the work in flight, however long a user's history:
    its plan, the cached generic one included, reads the partial index of unfinished jobs."""
    user, headers = await users.create()
    image = await upload(client, headers, noise_png())
    async with app.state.sessionmaker() as session:
        await session.execute(
            text(
                "INSERT INTO jobs (id, owner_id, image_id, status, request_id, deadline_at, created_at) "
                "SELECT gen_random_uuid(), :owner, :image, CASE WHEN n <= 3 THEN 'queued' ELSE 'done' END, '', "
                "now() + interval '5 minutes', now() FROM generate_series(1, 5000) AS n"
            ),
            {"owner": user["id"], "image": uuid.UUID(image["id"])},
        )
        await session.commit()
        await session.execute(text("ANALYZE jobs"))
        sent: list[tuple[str, tuple[Any, ...]]] = []

        def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_args: Any) -> None:
            sent.append((statement, tuple(parameters)))

        engine = session.bind.sync_engine
        event.listen(engine, "before_cursor_execute", capture)
        try:
            assert await session.scalar(service._IN_FLIGHT, {"b_owner_id": user["id"]}) == 3
        finally:
            event.remove(engine, "before_cursor_execute", capture)
        # The statement exactly as sent, planned the way a cached prepared statement is.
        (sql, params), *_ = [(q, p) for q, p in sent if "count" in q]
        args = ", ".join(str(v) if isinstance(v, int) else f"'{v}'" for v in params)
        raw = (await (await session.connection()).get_raw_connection()).driver_connection
        await raw.execute("SET plan_cache_mode = force_generic_plan")
        try:
            await raw.execute(f"PREPARE in_flight AS {sql}")
            plan = await raw.fetchval(f"EXPLAIN (FORMAT JSON) EXECUTE in_flight({args})")
            await raw.execute("DEALLOCATE in_flight")
        finally:
            await raw.execute("RESET plan_cache_mode")
    assert "ix_jobs_unfinished_owner_id" in json.dumps(plan), plan


BAD_UPLOADS = PHOTOS.parent / "bad_uploads"


async def test_the_shared_bad_uploads_get_the_answers_their_readme_gives(
    client: httpx.AsyncClient, users: Users
) -> None:
    _, headers = await users.create()
    for name in ("truncated_half.webp", "jpeg_cut_inside_exif.jpg", "png_oversized_icc_chunk.png"):
        r = await client.post(
            "/model/predict",
            params={"models": "mobilenet_v2@1"},
            files={"file": (name, (BAD_UPLOADS / name).read_bytes())},
            headers=headers,
        )
        assert r.status_code == 422, (name, r.status_code, r.text)
        # The PNG is whole: only its ICC profile decompresses past Pillow's limit, and the answer says so.
        said = "ICC colour profile" if name.startswith("png_") else "truncated or corrupt"
        assert "Retry-After" not in r.headers and said in r.json()["detail"], name
    answers = {}
    for name in ("parrot_upright.jpg", "parrot_exif6_malformed_gps.jpg"):
        r = await client.post(
            "/model/predict",
            params={"models": "mobilenet_v2@1"},
            files={"file": (name, (BAD_UPLOADS / name).read_bytes())},
            headers=headers,
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["success"] is True, body
        answers[name] = body["prediction"]
        image_id = (await client.get(f"/v1/predictions/{body['job_id']}", headers=headers)).json()["image_id"]
        view = await client.get(f"/v1/images/{image_id}/view", headers=headers)
        assert view.status_code == 200 and view.headers["content-type"] == "image/png", name
    assert answers == {"parrot_upright.jpg": "macaw", "parrot_exif6_malformed_gps.jpg": "macaw"}


async def test_a_waiting_request_learns_soon_that_its_job_was_deleted(
    client: httpx.AsyncClient, app: Any, users: Users, admin_headers: dict[str, str]
) -> None:
    """The owner deleted (and the job with them) while /model/predict waits: 404 within a few
    seconds, not a 504 at the deadline; a job that lives on runs to the deadline."""
    user, headers = await users.create()
    image = await upload(client, headers, encode(Image.new("RGB", (8, 8), (9, 8, 7)), "PNG"))
    now = datetime.now(UTC)
    job_id = uuid.uuid4()
    async with app.state.sessionmaker() as session:
        session.add(
            Job(
                id=job_id,
                owner_id=user["id"],
                image_id=uuid.UUID(image["id"]),
                status="queued",
                request_id="r",
                deadline_at=now + timedelta(minutes=1),
                created_at=now,
            )
        )
        await session.commit()

    assert await waited(app, job_id, 0.5) == 504
    waiting = asyncio.create_task(waited(app, job_id, 30))
    await asyncio.sleep(0.3)
    started = asyncio.get_running_loop().time()
    assert (await client.delete(f"/v1/users/{user['id']}", headers=admin_headers)).status_code == 204
    assert await waiting == 404
    assert asyncio.get_running_loop().time() - started < service.GONE_CHECK_SECONDS + 1.5


async def test_a_new_upload_waits_for_a_delete_of_the_same_content_before_its_blob_is_stored(
    client: httpx.AsyncClient, users: Users, settings: Settings
) -> None:
    """A delete of the last upload of some content removes the blob while it holds the content's
    lock; a prediction of a new upload of that content must not store its blob and commit its row
    meanwhile, or the row would point at a blob the delete then removes."""
    _, headers = await users.create()
    data = noise_png()
    sha = hashlib.sha256(data).hexdigest()
    conn = await asyncpg.connect(settings.database_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        transaction = conn.transaction()
        await transaction.start()
        await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", sha)  # a delete in progress
        predicting = asyncio.create_task(
            client.post(
                "/model/predict", files={"file": ("n.png", data)}, params={"models": "mobilenet_v2"}, headers=headers
            )
        )
        await asyncio.sleep(1.0)
        assert not predicting.done()
        assert not any(settings.storage_dir.rglob(sha))  # nothing stored while the delete holds the lock
        await transaction.commit()
    finally:
        await conn.close()
    r = await predicting
    assert r.status_code == 200, r.text
    assert any(p.name == sha for p in settings.storage_dir.rglob(sha))


async def test_an_upload_waiting_for_its_blob_holds_up_no_other_request(settings: Settings, users: Users) -> None:
    """User V's upload waits for its content's blob lock (another upload or delete of the same
    content holds it). Meanwhile V's predictions of stored images, more of them than the pool
    has connections, and user W's go through at once: the wait holds no lock V's other requests
    need, so they do not queue behind it holding connections."""
    (_, v_headers), (_, w_headers) = await users.create(), await users.create()
    app = create_app(settings.model_copy(update={"max_jobs_in_flight_per_user": 50, "db_pool_size": 3}))
    async for c in client_for(app):
        v_image = await upload(c, v_headers, noise_png(8, 16))
        w_image = await upload(c, w_headers, noise_png(9, 16))
        data = noise_png(10, 16)
        conn, tx = await blob_lock(settings, hashlib.sha256(data).hexdigest())
        try:
            stuck = asyncio.create_task(
                c.post("/model/predict?models=sketch@1", files={"file": ("x.png", data)}, headers=v_headers)
            )
            await waiting_on_lock(settings, 1)
            loop = asyncio.get_running_loop()
            start = loop.time()
            others = await asyncio.wait_for(
                asyncio.gather(
                    *(
                        c.post("/v1/predictions", json={"image_id": image["id"], "models": ["sketch@1"]}, headers=h)
                        for image, h in [(v_image, v_headers)] * 4 + [(w_image, w_headers)]
                    )
                ),
                timeout=5,
            )
            took = loop.time() - start
            assert not stuck.done()
        finally:
            await tx.rollback()
            await conn.close()
        assert [r.status_code for r in others] == [202] * 5, [r.text for r in others]
        assert took < 3, took
        r = await stuck
        assert r.status_code == 200 and r.json()["results"]["sketch@1"]["status"] == "done", r.text
        for r in others:
            await wait_job(c, v_headers if r is not others[-1] else w_headers, r.json()["job_id"])


async def test_a_refused_upload_leaves_no_blob(settings: Settings, users: Users) -> None:
    """An upload refused for too many predictions in flight stores nothing, neither its row nor
    its blob, and leaves the blob another upload of the same content has."""
    _, headers = await users.create()
    capped = create_app(settings.model_copy(update={"max_jobs_in_flight_per_user": 0}))
    async for c in client_for(capped):
        data = noise_png()
        r = await c.post("/model/predict?models=mobilenet_v2", files={"file": ("x.png", data)}, headers=headers)
        assert r.status_code == 429 and "retry-after" in r.headers, r.text
        assert not list(settings.storage_dir.rglob(f"{hashlib.sha256(data).hexdigest()}*"))
        assert (await c.get("/v1/images", headers=headers)).json()["data"] == []
        kept = (await c.post("/v1/images", files={"file": ("k.png", data)}, headers=headers)).json()
        r = await c.post("/model/predict?models=mobilenet_v2", files={"file": ("x.png", data)}, headers=headers)
        assert r.status_code == 429
        assert [p.name for p in settings.storage_dir.rglob(kept["sha256"])] == [kept["sha256"]]


async def test_a_prediction_is_admitted_and_stored_on_the_driver(
    client: httpx.AsyncClient, app: Any, users: Users
) -> None:
    """A prediction's transaction (the count and locks of admission, the job's insert) goes to
    the asyncpg driver directly (``core.driver``), nothing of it through SQLAlchemy's execution
    layer, and the job's insert is built and compiled once per shape, not per prediction."""
    _, headers = await users.create()
    images = [
        await upload(client, headers, encode(Image.new("RGB", (8, 8), (shade, 4, 5)), "PNG")) for shade in range(3)
    ]
    seen: list[str] = []

    def on_execute(conn: object, cursor: object, statement: str, params: object, context: Any, many: bool) -> None:
        seen.append(statement)

    service._insert_job_statement.cache_clear()
    engine = app.state.engine.sync_engine
    event.listen(engine, "after_cursor_execute", on_execute)
    try:
        for image in images:
            r = await client.post(
                "/v1/predictions", json={"image_id": image["id"], "models": ["mobilenet_v2", "sketch"]}, headers=headers
            )
            assert r.status_code == 202, r.text
    finally:
        event.remove(engine, "after_cursor_execute", on_execute)
    assert not [s for s in seen if "INSERT INTO jobs" in s or "FOR KEY SHARE" in s], seen
    info = service._insert_job_statement.cache_info()
    assert (info.misses, info.hits) == (1, 2), info


async def test_an_image_deleted_between_its_read_and_its_jobs_insert_is_404(
    client: httpx.AsyncClient, users: Users, monkeypatch: pytest.MonkeyPatch
) -> None:
    """POST /v1/predictions reads the image, then stores the job in a transaction of its own; the
    image is deleted in between: a 404 that says so, not a generic conflict, and no job."""
    _, headers = await users.create()
    image = await upload(client, headers, noise_png(77, 16))
    get_owned = images_service.get_owned_image

    async def read_then_deleted(**kw: Any) -> Any:
        found = await get_owned(**kw)
        monkeypatch.setattr(images_service, "get_owned_image", get_owned)  # the delete's own read
        assert (await client.delete(f"/v1/images/{image['id']}", headers=headers)).status_code == 204
        return found

    monkeypatch.setattr(images_service, "get_owned_image", read_then_deleted)
    r = await client.post(
        "/v1/predictions", json={"image_id": image["id"], "models": ["mobilenet_v2"]}, headers=headers
    )
    assert r.status_code == 404 and "deleted meanwhile" in r.json()["detail"], r.text
    assert (await client.get("/v1/predictions", params={"total": True}, headers=headers)).json()["count"] == 0
