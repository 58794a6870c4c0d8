"""Verdicts on predictions: what a verdict is for may be deleted while it is being given."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import httpx
import pytest

from api.app.core.config import Settings
from api.app.feedback import service as feedback_service
from tests.api.conftest import stored_job
from tests.conftest import Users
from tests.images import noise_png

pytestmark = pytest.mark.usefixtures("everything_served")


async def answered(settings: Settings, job_id: str) -> None:
    """The job's predictions answered "macaw", as a worker would."""
    conn = await asyncpg.connect(settings.database_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        await conn.execute(
            "UPDATE predictions SET status = 'done', label = 'macaw', score = 0.9 WHERE job_id = $1", uuid.UUID(job_id)
        )
        await conn.execute("UPDATE jobs SET status = 'done' WHERE id = $1", uuid.UUID(job_id))
    finally:
        await conn.close()


async def test_a_verdict_on_a_prediction_deleted_meanwhile_is_404(
    client: httpx.AsyncClient, users: Users, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The verdict reads its prediction, then the image is deleted (with its jobs and
    predictions), then the verdict is stored: a 404 that says so, not a generic conflict."""
    _, headers = await users.create()
    image = (await client.post("/v1/images", files={"file": ("a.png", noise_png(91, 16))}, headers=headers)).json()
    r = await client.post(
        "/v1/predictions", json={"image_id": image["id"], "models": ["mobilenet_v2@1"]}, headers=headers
    )
    assert r.status_code == 202, r.text
    # Answered, as a worker would: a verdict needs an answer.
    await answered(settings, r.json()["job_id"])
    job = (await client.get(f"/v1/predictions/{r.json()['job_id']}", headers=headers)).json()
    [prediction] = job["results"]
    owned = feedback_service.owned_prediction

    async def read_then_deleted(**kw: Any) -> Any:
        found = await owned(**kw)
        assert (await client.delete(f"/v1/images/{image['id']}", headers=headers)).status_code == 204
        return found

    monkeypatch.setattr(feedback_service, "owned_prediction", read_then_deleted)
    body = {"prediction_id": prediction["id"], "is_correct": False}
    r = await client.post("/v1/feedback", json=body, headers=headers)
    assert r.status_code == 404 and "deleted meanwhile" in r.json()["detail"], r.text


async def test_classic_feedback_on_a_prediction_deleted_meanwhile_is_kept_unlinked(
    client: httpx.AsyncClient, users: Users, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``/feedback/`` finds the prediction its image file name names, then the image is deleted
    (with its jobs and predictions), then the feedback is stored: kept, without the link, rather
    than refused with a generic conflict."""
    _, headers = await users.create()
    image = (await client.post("/v1/images", files={"file": ("a.png", noise_png(92, 16))}, headers=headers)).json()
    r = await client.post(
        "/v1/predictions", json={"image_id": image["id"], "models": ["mobilenet_v2@1"]}, headers=headers
    )
    assert r.status_code == 202, r.text
    # Answered, as a worker would: the classic client names the image and the answer's label.
    await answered(settings, r.json()["job_id"])
    latest = feedback_service.latest_matching_prediction

    async def read_then_deleted(**kw: Any) -> Any:
        found = await latest(**kw)
        assert found is not None
        assert (await client.delete(f"/v1/images/{image['id']}", headers=headers)).status_code == 204
        return found

    monkeypatch.setattr(feedback_service, "latest_matching_prediction", read_then_deleted)
    file_name = f"{image['sha256']}.png"
    body = {"feedback": "not this", "score": 0.9, "predicted_class": "macaw", "image_file_name": file_name}
    r = await client.post("/feedback/", json=body, headers=headers)
    assert r.status_code == 201, r.text
    stored = r.json()
    assert stored["prediction_id"] is None and stored["comment"] == "not this"
    assert stored["image_file_name"] == file_name and stored["predicted_class"] == "macaw"
    listed = (await client.get("/feedback/", headers=headers)).json()
    assert [f["id"] for f in listed] == [stored["id"]]


async def test_classic_feedback_that_says_nothing_is_refused(client: httpx.AsyncClient, users: Users) -> None:
    _, headers = await users.create()
    blank = ["", "   ", "\t\n", "\u200b"]
    for empty in ({}, {"score": None, "feedback": None}, *({"feedback": b, "predicted_class": b} for b in blank)):
        r = await client.post("/feedback/", json=empty, headers=headers)
        assert r.status_code == 422 and "Say something" in r.text, r.text
    assert (await client.get("/feedback/", headers=headers)).json() == []


async def test_a_verdict_needs_an_answer_to_judge(client: httpx.AsyncClient, app: Any, users: Users) -> None:
    """A prediction that expired (or failed) has no label: a verdict on it is 422, and none is stored."""
    user, headers = await users.create()
    image = (await client.post("/v1/images", files={"file": ("e.png", noise_png(92, 16))}, headers=headers)).json()
    _, prediction = await stored_job(
        app,
        owner_id=user["id"],
        image_id=image["id"],
        status="expired",
        model="mobilenet_v2",
        error="deadline passed in the queue",
        deadline_seconds=0,
    )
    for body in ({"is_correct": True}, {"is_correct": False, "correct_label": "macaw"}):
        r = await client.post("/v1/feedback", json={"prediction_id": str(prediction.id), **body}, headers=headers)
        assert r.status_code == 422 and "no answer to judge (it is expired)" in r.json()["detail"], r.text
    assert (await client.get("/v1/feedback", headers=headers)).json()["data"] == []


async def test_the_right_label_may_be_one_a_newer_version_of_the_model_knows(
    client: httpx.AsyncClient, app: Any, users: Users, settings: Settings
) -> None:
    """sketch@1 (6 categories) called an airplane a cat: "airplane", which sketch@3 (served, 20
    categories) knows, is taken as the right label and kept as the model's labelled example; it
    was 422, and the person could only say "wrong". A label no served version knows stays 422."""
    import json

    from contracts import keys

    six = ["apple", "bicycle", "cat", "diamond", "eye", "fish"]
    twenty = [*six, "airplane", "banana", "bird", "book", "circle", "clock", "crown", "dog", "flower", "house"]
    # As the workers serving them publish them (the same lists: set only where none is yet).
    await app.state.redis.set(keys.labels_key("sketch", 1), json.dumps(six), nx=True)
    await app.state.redis.set(keys.labels_key("sketch", 3), json.dumps(twenty), nx=True)
    _, headers = await users.create()
    image = (await client.post("/v1/images", files={"file": ("a.png", noise_png(93, 16))}, headers=headers)).json()
    r = await client.post("/v1/predictions", json={"image_id": image["id"], "models": ["sketch@1"]}, headers=headers)
    assert r.status_code == 202, r.text
    conn = await asyncpg.connect(settings.database_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        await conn.execute(
            "UPDATE predictions SET status = 'done', label = 'cat', score = 0.6 WHERE job_id = $1",
            uuid.UUID(r.json()["job_id"]),
        )
    finally:
        await conn.close()
    job = (await client.get(f"/v1/predictions/{r.json()['job_id']}", headers=headers)).json()
    [prediction] = job["results"]
    body = {"prediction_id": prediction["id"], "is_correct": False, "correct_label": "giraffe"}
    refused = await client.post("/v1/feedback", json=body, headers=headers)
    assert refused.status_code == 422 and "nor of a version of sketch served now" in refused.text, refused.text
    body["correct_label"] = "airplane"
    r = await client.post("/v1/feedback", json=body, headers=headers)
    assert r.status_code == 201, r.text
    assert r.json()["correct_label"] == "airplane"
