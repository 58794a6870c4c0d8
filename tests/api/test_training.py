"""The retraining loop end to end: users' verdicts, the trigger, a training run in the training
worker with its progress, the candidate in shadow with its record, the comparison and the
promotion; and runs cancelled or lost with their trainer."""

from __future__ import annotations

import asyncio
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from api.app.training import service as training_service
from api.app.training.models import TrainingRun
from contracts import training
from model.config import ModelSettings
from tests.api.conftest import Stack, until
from tests.api.test_releases import canvas_drawings, classify
from tests.conftest import ADMIN_EMAIL, ADMIN_PASSWORD, PASSWORD, login
from tests.support import Service, service

CATEGORIES = ("apple", "bicycle", "cat", "diamond", "eye", "fish")
TRIGGER_AT = 200


@pytest.fixture
def trained_dir(tmp_path: Path) -> Path:
    """A trained-models folder of the test's own, holding the suite's sketch v1 and v2: what runs
    train lands here, not in the suite's."""
    source = ModelSettings().trained_dir / "sketch"
    folder = tmp_path / "trained"
    (folder / "sketch").mkdir(parents=True)
    for version in ("v1", "v2"):
        (folder / "sketch" / version).symlink_to(source / version, target_is_directory=True)
    return folder


def start_trainer(stack: Stack, trained: Path) -> Service:
    name = f"trainer-{uuid.uuid4().hex[:6]}"
    trainer = service(
        name,
        [sys.executable, "-m", "model.trainer"],
        {"REDIS_URL": stack.redis_server.url, "WORKER_ID": name, "TRAINED_DIR": str(trained), "LOG_JSON": "true"},
    )
    stack.workers.append(trainer)
    return trainer


async def run_of(stack: Stack, admin: dict[str, str], run_id: str) -> dict[str, Any]:
    r = await stack.client.get(f"/v1/admin/training-runs/{run_id}", headers=admin)
    assert r.status_code == 200, r.text
    return dict(r.json())


@pytest.mark.parametrize(
    "own_stack",
    [{"retrain_min_new_labels": TRIGGER_AT, "retrain_check_seconds": 1.0, "retrain_epochs": 2}],
    indirect=True,
)
async def test_verdicts_retrain_a_candidate_that_is_compared_before_promotion(
    own_stack: Stack, trained_dir: Path
) -> None:
    client = own_stack.client
    admin = await login(client, ADMIN_EMAIL, ADMIN_PASSWORD)
    email = f"drawer-{uuid.uuid4().hex[:6]}@example.com"
    assert (
        await client.post("/v1/users", json={"email": email, "password": PASSWORD}, headers=admin)
    ).status_code == 201
    user = await login(client, email, PASSWORD)
    await own_stack.start_workers(1, SERVE_MODELS="sketch", TRAINED_DIR=str(trained_dir))
    start_trainer(own_stack, trained_dir)

    # 300 canvas drawings get verdicts through the API.
    gate = asyncio.Semaphore(8)

    async def label(category: str, data: bytes) -> None:
        async with gate:
            answer = await classify(own_stack, user, data, "sketch@1")
            body: dict[str, Any] = {"prediction_id": answer["id"], "is_correct": answer["label"] == category}
            if answer["label"] != category:
                body["correct_label"] = category
            r = await client.post("/v1/feedback", json=body, headers=user)
            assert r.status_code == 201, r.text

    await asyncio.gather(*(label(c, d) for c in CATEGORIES for d in canvas_drawings(c, 50)))

    # The trigger starts a run; its progress is readable while it trains.
    runs_url = "/v1/admin/training-runs"

    async def triggered() -> bool:
        return bool((await client.get(runs_url, params={"model": "sketch"}, headers=admin)).json()["data"])

    await until(triggered, 30, "the trigger started a run")
    [run] = (await client.get(runs_url, params={"model": "sketch"}, headers=admin)).json()["data"]
    assert run["trigger"] == "auto" and run["version"] == 3 and run["base_version"] == 1
    assert run["examples"]["train"] >= TRIGGER_AT and run["examples"]["exported"] >= TRIGGER_AT
    seen: list[dict[str, Any]] = []

    async def finished() -> bool:
        now = await run_of(own_stack, admin, run["id"])
        seen.append(now)
        assert now["status"] in ("queued", "running", "done"), now
        return bool(now["status"] == "done")

    await until(finished, 240, "the run finished")
    assert any(s["status"] == "running" and s["epoch"] >= 1 and s["eta_seconds"] is not None for s in seen), seen
    done = seen[-1]
    assert [h["epoch"] for h in done["history"]] == [1, 2] and all("val_accuracy" in h for h in done["history"])
    record = done["record"]
    assert record["feedback"]["drawings"] > 0 and record["feedback"]["test_drawings"] > 0
    assert set(record["per_class"]) == set(CATEGORIES) and 0 < record["macro_f1"] <= 1
    assert len(record["confusion_matrix"]["rows_true_columns_predicted"]) == len(CATEGORIES)

    # The candidate is in shadow with its training record, loaded by the worker, then compared.
    versions = (await client.get("/v1/admin/registry", headers=admin)).json()["versions"]
    candidate = next(v for v in versions if v["name"] == "sketch" and v["version"] == 3)
    assert (candidate["channel"], candidate["weight"]) == ("shadow", 0)
    r = await client.get("/v1/admin/registry/models/sketch/versions/3/training", headers=admin)
    assert r.status_code == 200 and r.json()["id"] == run["id"]

    async def served() -> bool:
        availability = await own_stack.app.state.workers.availability(fresh=True)
        return "sketch@3" in availability and availability["sketch@3"].available

    await until(served, 60, "the worker serves sketch@3")
    comparison = (
        await client.get("/v1/admin/registry/models/sketch/compare", params={"candidate": 3}, headers=admin)
    ).json()
    assert comparison["candidate"]["heldout_accuracy"] == pytest.approx(record["test_accuracy"])
    promote = await client.post(
        "/v1/admin/registry/models/sketch/versions/3/promote", json={"reason": "retrained"}, headers=admin
    )
    if comparison["verdict"] == "worse":
        assert promote.status_code == 409 and "held-out accuracy" in promote.json()["detail"], promote.text
    else:
        assert promote.status_code == 200, promote.text


@pytest.mark.parametrize("own_stack", [{"retrain_check_seconds": 1.0}], indirect=True)
async def test_runs_are_cancelled_or_failed_never_left_hanging(own_stack: Stack, trained_dir: Path) -> None:
    client = own_stack.client
    admin = await login(client, ADMIN_EMAIL, ADMIN_PASSWORD)
    await own_stack.start_workers(1, SERVE_MODELS="sketch", TRAINED_DIR=str(trained_dir))
    long = {"epochs": 40, "per_category": 400}
    body = {"model": "sketch", "options": long, "reason": "try"}

    # Refusals: not a sketch model, unknown model, bad options, a second run while one is queued.
    assert (
        await client.post("/v1/admin/training-runs", json={**body, "model": "birds"}, headers=admin)
    ).status_code == 422
    assert (
        await client.post("/v1/admin/training-runs", json={**body, "model": "nothing"}, headers=admin)
    ).status_code == 404
    bad = {**body, "options": {"epochs": 0}}
    assert (await client.post("/v1/admin/training-runs", json=bad, headers=admin)).status_code == 422

    # Queued with no trainer yet: cancelled at once.
    r = await client.post("/v1/admin/training-runs", json=body, headers=admin)
    assert r.status_code == 202, r.text
    queued = r.json()
    assert (await client.post("/v1/admin/training-runs", json=body, headers=admin)).status_code == 409
    r = await client.post(f"/v1/admin/training-runs/{queued['id']}/cancel", headers=admin)
    assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
    assert (await client.post(f"/v1/admin/training-runs/{queued['id']}/cancel", headers=admin)).status_code == 409

    # Running: cancelled after the epoch it is in.
    trainer = start_trainer(own_stack, trained_dir)
    running = (await client.post("/v1/admin/training-runs", json=body, headers=admin)).json()

    async def trained_an_epoch(run_id: str) -> bool:
        now = await run_of(own_stack, admin, run_id)
        return bool(now["status"] == "running" and now["epoch"] >= 1)

    await until(lambda: trained_an_epoch(running["id"]), 120, "an epoch trained")
    assert (await client.post(f"/v1/admin/training-runs/{running['id']}/cancel", headers=admin)).status_code == 200

    async def ended(run_id: str, status: str) -> bool:
        return bool((await run_of(own_stack, admin, run_id))["status"] == status)

    await until(lambda: ended(running["id"], "cancelled"), 60, "the run cancelled")
    assert not (trained_dir / "sketch" / f"v{running['version']}" / "model.keras").exists()

    # A trainer killed mid-run: the run fails with the reason, soon after its liveness key expires.
    lost = (await client.post("/v1/admin/training-runs", json=body, headers=admin)).json()
    await until(lambda: trained_an_epoch(lost["id"]), 120, "an epoch trained")
    trainer.kill()
    await until(lambda: ended(lost["id"], "failed"), 40, "the run failed")
    assert "trainer stopped" in (await run_of(own_stack, admin, lost["id"]))["error"]
    versions = (await client.get("/v1/admin/registry", headers=admin)).json()["versions"]
    assert {v["version"] for v in versions if v["name"] == "sketch"} == {1, 2}


async def test_a_run_whose_end_is_on_its_way_is_not_failed(own_stack: Stack) -> None:
    """The trainer lets go of its liveness key once it has reported the end: a check between the
    two must not take the run for one whose trainer died."""
    redis = own_stack.app.state.redis
    async with own_stack.app.state.sessionmaker() as session:
        runs = [
            TrainingRun(
                id=uuid.uuid4(),
                model_name="sketch",
                version=version,
                base_version=1,
                status="running",
                trigger="admin",
                requested_by="test",
                reason="test",
                options={},
                categories=[],
                examples={},
                history=[],
                started_at=datetime.now(UTC) - timedelta(minutes=5),
            )
            for version in (50, 51)
        ]
        await redis.set(training.ended_key(str(runs[0].id)), "done")
        session.add_all(runs)
        await session.commit()
        # The API's own check may come first: either way, only the run without an end is failed.
        await training_service.fail_stale(session=session, redis=redis)
        statuses = {r.version: r.status for r in await training_service.list_runs(session=session, model="sketch")}
    assert statuses == {50: "running", 51: "failed"}
