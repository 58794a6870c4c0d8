"""The retraining loop end to end: users' verdicts, the trigger, a training run in the training
worker with its progress, the candidate in shadow with its record, the comparison and the
promotion; and runs cancelled or lost with their trainer."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi import HTTPException

from api.app.core.config import Settings
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
    """A trained-models folder of the test's own, holding the suite's sketch v1 to v3: what runs
    train lands here, not in the suite's."""
    source = ModelSettings().trained_dir / "sketch"
    folder = tmp_path / "trained"
    (folder / "sketch").mkdir(parents=True)
    for version in ("v1", "v2", "v3"):
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


def a_run(version: int, *, status: str, base: int, **more: Any) -> TrainingRun:
    """A sketch training run row written straight to the database, as the API would have."""
    return TrainingRun(
        id=uuid.uuid4(),
        model_name="sketch",
        version=version,
        base_version=base,
        status=status,
        trigger="admin",
        requested_by="test",
        reason="test",
        options={},
        categories=[],
        examples={},
        history=[],
        **more,
    )


async def run_of(stack: Stack, admin: dict[str, str], run_id: str) -> dict[str, Any]:
    r = await stack.client.get(f"/v1/admin/training-runs/{run_id}", headers=admin)
    assert r.status_code == 200, r.text
    return dict(r.json())


@pytest.mark.parametrize(
    "own_stack",
    [{"retrain_min_new_labels": TRIGGER_AT, "retrain_check_seconds": 1.0, "retrain_epochs": 2, "auto_promote": True}],
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

    # Runs start from the stable version: the 6-class one here, so that the run trains quickly.
    async def served_v1() -> bool:
        availability = await own_stack.app.state.workers.availability(fresh=True)
        return "sketch@1" in availability and availability["sketch@1"].available

    await until(served_v1, 60, "the worker serves sketch@1")
    r = await client.post(
        "/v1/admin/registry/models/sketch/versions/1/promote",
        json={"reason": "retrain the 6-class version", "force": True},
        headers=admin,
    )
    assert r.status_code == 200, r.text

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
    assert run["trigger"] == "auto" and run["version"] == 4 and run["base_version"] == 1
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
    candidate = next(v for v in versions if v["name"] == "sketch" and v["version"] == 4)
    assert (candidate["channel"], candidate["weight"]) == ("shadow", 0)
    r = await client.get("/v1/admin/registry/models/sketch/versions/4/training", headers=admin)
    assert r.status_code == 200, r.text
    assert (r.json()["source"], r.json()["run"]["id"], r.json()["record"]) == ("run", run["id"], record)

    # The base version was trained before runs existed: its record is the trainer-published metrics.json.
    async def base_record() -> bool:
        url = "/v1/admin/registry/models/sketch/versions/1/training"
        return (await client.get(url, headers=admin)).status_code == 200

    await until(base_record, 30, "the trainer published sketch@1's metrics.json")
    base = (await client.get("/v1/admin/registry/models/sketch/versions/1/training", headers=admin)).json()
    assert base["source"] == "metrics.json" and base["run"] is None
    assert len(base["record"]["history"]) == base["record"]["epochs"] and "confusion_matrix" in base["record"]
    r = await client.get("/v1/admin/registry/models/birds/versions/1/training", headers=admin)
    assert r.status_code == 404 and "not trained by this portal" in r.json()["detail"], r.text
    r = await client.get("/v1/admin/registry/models/mobilenet_v2/versions/2/training", headers=admin)
    assert r.status_code == 404 and "mobilenet_v2@1 quantized to INT8" in r.json()["detail"], r.text

    # The auto-promote rule compares the served candidate with the stable version and decides.
    async def decided() -> bool:
        return (await run_of(own_stack, admin, run["id"]))["promotion"] is not None

    await until(decided, 90, "the auto-promote rule decided")
    promotion = (await run_of(own_stack, admin, run["id"]))["promotion"]
    worse = record["test_accuracy"] < base["record"]["test_accuracy"] - own_stack.app.state.settings.promotion_margin
    versions = {
        v["version"]: v
        for v in (await client.get("/v1/admin/registry", headers=admin)).json()["versions"]
        if v["name"] == "sketch"
    }
    last = (await client.get("/v1/admin/registry/changes", params={"model": "sketch"}, headers=admin)).json()["data"][0]
    if worse:
        assert promotion.startswith("not promoted: worse") and "held-out accuracy" in promotion, promotion
        assert versions[4]["channel"] == "shadow" and versions[1]["channel"] == "stable"
    else:
        assert promotion.startswith("promoted: held-out accuracy"), promotion
        assert versions[4]["channel"] == "stable" and versions[1]["channel"] != "stable"
        assert (last["action"], last["actor"], last["version"]) == ("promote", "auto-promote rule", 4), last


@pytest.mark.parametrize("own_stack", [{"retrain_check_seconds": 1.0}], indirect=True)
async def test_runs_are_cancelled_or_failed_never_left_hanging(own_stack: Stack, trained_dir: Path) -> None:
    client = own_stack.client
    admin = await login(client, ADMIN_EMAIL, ADMIN_PASSWORD)
    await own_stack.start_workers(1, SERVE_MODELS="sketch", TRAINED_DIR=str(trained_dir))
    long = {"epochs": 40, "per_category": 100}  # an epoch of 2,000 drawings: seconds, not a minute
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
    not_a_number = {**body, "base_version": True}  # not read as version 1
    assert (await client.post("/v1/admin/training-runs", json=not_a_number, headers=admin)).status_code == 422
    misplaced = {**body, "per_category": 50}  # an option beside "options", not in it
    r = await client.post("/v1/admin/training-runs", json=misplaced, headers=admin)
    assert r.status_code == 422 and "per_category" in r.text, r.text

    # A model store kept across a database reset holds sketch@7, which no row knows: the next run
    # is numbered after it.
    await own_stack.app.state.redis.hset(training.RECORDS_KEY, "sketch/v7", "{}")
    for other in (b"sketch2/v20", b"sketch/v\xd9\xa3", b"\xffsketch/v30"):  # not sketch's, not digits, not UTF-8
        await own_stack.app.state.redis.hset(training.RECORDS_KEY, other, "{}")

    # Queued with no trainer yet: cancelled at once. Asked for three times at once, one is queued
    # and the others are told so; their exported examples are not left behind.
    answers = await asyncio.gather(
        *(client.post("/v1/admin/training-runs", json=body, headers=admin) for _ in range(3))
    )
    assert sorted(a.status_code for a in answers) == [202, 409, 409], [a.text for a in answers]
    for refused in (a for a in answers if a.status_code == 409):
        detail = refused.json()["detail"]
        assert "is queued or running" in detail or "started at the same moment: it is queued now" in detail, detail
    r = next(a for a in answers if a.status_code == 202)
    queued = r.json()
    data_dir = own_stack.app.state.settings.training_data_dir
    assert [p.name for p in data_dir.iterdir()] == [queued["id"]]
    assert queued["version"] == 8, queued
    assert (await client.post("/v1/admin/training-runs", json=body, headers=admin)).status_code == 409
    r = await client.post(f"/v1/admin/training-runs/{queued['id']}/cancel", headers=admin)
    assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
    assert (await client.post(f"/v1/admin/training-runs/{queued['id']}/cancel", headers=admin)).status_code == 409

    # Running: cancelled within seconds, part-way through the epoch it is in.
    trainer = start_trainer(own_stack, trained_dir)
    running = (await client.post("/v1/admin/training-runs", json=body, headers=admin)).json()

    async def trained_an_epoch(run_id: str) -> bool:
        now = await run_of(own_stack, admin, run_id)
        return bool(now["status"] == "running" and now["epoch"] >= 1)

    await until(lambda: trained_an_epoch(running["id"]), 120, "an epoch trained")
    r = await client.post(f"/v1/admin/training-runs/{running['id']}/cancel", headers=admin)
    assert r.status_code == 200, r.text
    # Until the trainer stops it the run is still running, and says that a cancel was asked for.
    asked = r.json()["cancel_requested_at"]
    assert asked is not None and r.json()["status"] == "running", r.text
    again = await client.post(f"/v1/admin/training-runs/{running['id']}/cancel", headers=admin)
    assert again.status_code == 409 or again.json()["cancel_requested_at"] == asked, again.text
    assert (await run_of(own_stack, admin, running["id"]))["cancel_requested_at"] == asked

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
    assert {v["version"] for v in versions if v["name"] == "sketch"} == {1, 2, 3}


async def test_a_run_whose_end_is_on_its_way_is_not_failed(own_stack: Stack) -> None:
    """The trainer lets go of its liveness key once it has reported the end: a check between the
    two must not take the run for one whose trainer died."""
    redis = own_stack.app.state.redis
    async with own_stack.app.state.sessionmaker() as session:
        runs = [
            a_run(version, status="running", base=1, started_at=datetime.now(UTC) - timedelta(minutes=5))
            for version in (50, 51)
        ]
        await redis.set(training.ended_key(str(runs[0].id)), "done")
        session.add_all(runs)
        await session.commit()
        # The API's own check may come first: either way, only the run without an end is failed.
        await training_service.fail_stale(session=session, redis=redis)
        statuses = {r.version: r.status for r in await training_service.list_runs(session=session, model="sketch")}
    assert statuses == {50: "running", 51: "failed"}
    # A trainer that lost its key but lives on is told to stop, as at a cancel: no model it trains
    # to the end is left unregistered in the store.
    assert await redis.exists(training.cancel_key(str(runs[1].id)))
    assert not await redis.exists(training.cancel_key(str(runs[0].id)))


async def test_a_run_whose_key_a_redis_restart_lost_is_not_failed_once_its_trainer_sets_it_again(
    own_stack: Stack,
) -> None:
    """A Redis restarted without persistence has no liveness key until the trainer's next renewal,
    a few seconds on: a check in between took the live run for one whose trainer had stopped."""
    redis = own_stack.app.state.redis
    run = a_run(56, status="running", base=1, started_at=datetime.now(UTC) - timedelta(minutes=5))
    async with own_stack.app.state.sessionmaker() as session:
        session.add(run)
        await session.commit()

    async def renewed() -> None:
        await asyncio.sleep(1)
        await redis.set(training.alive_key(str(run.id)), "trainer-test", ex=training.ALIVE_TTL_S)

    renewal = asyncio.create_task(renewed())
    async with own_stack.app.state.sessionmaker() as session:
        assert await training_service.fail_stale(session=session, redis=redis) == 0
    await renewal
    async with own_stack.app.state.sessionmaker() as session:
        assert (await session.get_one(TrainingRun, run.id)).status == "running"
        # Its trainer gone for good: failed at the next check (this one, or the API's own).
        await redis.delete(training.alive_key(str(run.id)))
        await training_service.fail_stale(session=session, redis=redis)
    async with own_stack.app.state.sessionmaker() as session:
        after = await session.get_one(TrainingRun, run.id)
        assert (after.status, after.error) == ("failed", training_service.TRAINER_STOPPED)


async def _event_group_ready(redis: Any) -> bool:
    groups = await redis.xinfo_groups(training.EVENT_STREAM) if await redis.exists(training.EVENT_STREAM) else []
    return any(g["name"] in (training.EVENT_GROUP, training.EVENT_GROUP.encode()) for g in groups)


async def test_a_run_whose_reported_end_never_came_is_failed_after_the_grace(own_stack: Stack) -> None:
    """The trainer set the run's ended key and stopped before its report reached the stream (or
    the report was lost): once END_GRACE_S has passed with no training event left to read, the
    run is failed with why. Before, it read running for the key's 7 days, could not be
    cancelled (409) and held up every other run of its model."""
    redis = own_stack.app.state.redis
    await until(lambda: _event_group_ready(redis), 30, "the API's training event group")
    async with own_stack.app.state.sessionmaker() as session:
        runs = [
            a_run(version, status="running", base=1, started_at=datetime.now(UTC) - timedelta(minutes=5))
            for version in (52, 53)
        ]
        session.add_all(runs)
        await session.commit()
        for run, age in zip(runs, (training_service.END_GRACE_S + 60, 10), strict=True):
            await redis.set(training.ended_key(str(run.id)), "done", ex=int(training.ENDED_TTL_S - age))
        assert await training_service.fail_stale(session=session, redis=redis) == 1
        by_version = {r.version: r for r in await training_service.list_runs(session=session, model="sketch")}
    assert (by_version[52].status, by_version[52].error) == ("failed", training_service.END_NOT_RECORDED)
    assert by_version[53].status == "running"
    # Its version's record says which run was to make it, and why there is none.
    admin = await login(own_stack.client, ADMIN_EMAIL, ADMIN_PASSWORD)
    r = await own_stack.client.get("/v1/admin/registry/models/sketch/versions/52/training", headers=admin)
    assert r.status_code == 404, r.text
    assert r.json()["detail"] == (
        f"No version sketch@52: training run {by_version[52].id}, which was to make it, ended failed: "
        + training_service.END_NOT_RECORDED
        + "."
    )


async def test_a_run_whose_end_is_applied_during_the_check_is_not_failed_over_it(
    own_stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check read the run as running; its end (done) is applied while the check asks Redis
    about it (an API back from an outage reads the end at once): the run stays done. (The API's
    own periodic check may be the one that meets it: everything is in place before the run's row
    exists, so whichever check reads it first reads its end as well.)"""
    redis = own_stack.app.state.redis
    run = a_run(55, status="running", base=1, started_at=datetime.now(UTC) - timedelta(minutes=5))
    run_id = run.id

    async def applied_meanwhile(*_: Any) -> bool:
        async with own_stack.app.state.sessionmaker() as other:
            ended = await other.get_one(TrainingRun, run_id)
            ended.status, ended.finished_at = "done", datetime.now(UTC)
            await other.commit()
        return False

    monkeypatch.setattr(training_service, "_end_on_its_way", applied_meanwhile)
    await redis.set(training.ended_key(str(run_id)), "done", ex=int(training.ENDED_TTL_S - 600))
    async with own_stack.app.state.sessionmaker() as session:
        session.add(run)
        await session.commit()
    async with own_stack.app.state.sessionmaker() as session:
        assert await training_service.fail_stale(session=session, redis=redis) == 0
    async with own_stack.app.state.sessionmaker() as session:
        after = await session.get_one(TrainingRun, run_id)
        assert (after.status, after.error) == ("done", None)


async def test_a_runs_end_that_cannot_be_applied_fails_the_run(
    own_stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trainer's "done" whose handling raises (here, a registry entry that cannot be made) is
    dropped, and its run is failed with the first line of why, not left running for good."""
    redis = own_stack.app.state.redis
    admin = await login(own_stack.client, ADMIN_EMAIL, ADMIN_PASSWORD)

    def broken(*_: Any) -> Any:
        raise ValueError("display_name: String should have at most 200 characters\nmore detail")

    monkeypatch.setattr(training_service, "trained_entry", broken)
    async with own_stack.app.state.sessionmaker() as session:
        run = a_run(54, status="running", base=1, started_at=datetime.now(UTC))
        session.add(run)
        await session.commit()
        run_id = str(run.id)
    await until(lambda: _event_group_ready(redis), 30, "the API's training event group")
    await redis.set(training.ended_key(run_id), "done", ex=training.ENDED_TTL_S)
    done = training.TrainingEvent(run_id=run_id, kind="done", record={"test_accuracy": 0.5})
    await redis.xadd(training.EVENT_STREAM, done.to_fields())

    async def ended() -> bool:
        return (await run_of(own_stack, admin, run_id))["status"] != "running"

    await until(ended, 30, "the run's end")
    failed = await run_of(own_stack, admin, run_id)
    assert failed["status"] == "failed", failed
    assert failed["error"] == "its end could not be recorded: display_name: String should have at most 200 characters"


async def test_a_new_candidate_in_shadow_makes_the_earlier_ones_canaries(own_stack: Stack) -> None:
    """Three runs end one after another (their trainer's "done" on the event stream), beside a
    shadow an admin made: after the third, only its candidate and the admins' shadows get copies
    of the requests (a candidate an admin set back to shadow stays there); the earlier candidates
    are canaries without traffic, each change audited as the run that made it."""
    from api.app.registry import service as registry_service
    from contracts.registry import load_registry

    redis = own_stack.app.state.redis
    client = own_stack.client
    admin = await login(client, ADMIN_EMAIL, ADMIN_PASSWORD)
    base = next(m for m in load_registry(own_stack.app.state.settings.registry_path).models if m.key == "sketch@1")
    async with own_stack.app.state.sessionmaker() as session:
        hand = base.model_copy(update={"version": 40, "channel": "shadow", "training": None})
        actor = registry_service.Actor(None, "admin@example.com")
        await registry_service.register_version(session=session, actor=actor, entry=hand, reason="by hand")
    await until(lambda: _event_group_ready(redis), 30, "the API's training event group")
    run_ids = {}
    for version in (41, 42, 43):
        if version == 43:
            # The admin enables 41, stepped down by run 42, back in shadow: it stays there.
            async with own_stack.app.state.sessionmaker() as session:
                await registry_service.set_channel(
                    session=session,
                    actor=actor,
                    name="sketch",
                    version=41,
                    channel="shadow",
                    enabled=True,
                    reason="shadow again",
                    available={"sketch@41"},
                )
        async with own_stack.app.state.sessionmaker() as session:
            run = a_run(version, status="running", base=1, started_at=datetime.now(UTC))
            session.add(run)
            await session.commit()
            run_ids[version] = run_id = str(run.id)
        await redis.set(training.ended_key(run_id), "done", ex=training.ENDED_TTL_S)
        done = training.TrainingEvent(run_id=run_id, kind="done", record={"test_accuracy": 0.5})
        await redis.xadd(training.EVENT_STREAM, done.to_fields())

        async def ended(run_id: str = run_id) -> bool:
            return (await run_of(own_stack, admin, run_id))["status"] == "done"

        await until(ended, 30, f"run {version} done")
    # An older version's end reported late never demotes the newer candidate.
    async with own_stack.app.state.sessionmaker() as session:
        late = a_run(39, status="running", base=1, started_at=datetime.now(UTC))
        session.add(late)
        await session.commit()
        late_id = str(late.id)
    await redis.set(training.ended_key(late_id), "done", ex=training.ENDED_TTL_S)
    done = training.TrainingEvent(run_id=late_id, kind="done", record={"test_accuracy": 0.5})
    await redis.xadd(training.EVENT_STREAM, done.to_fields())

    async def late_ended() -> bool:
        return (await run_of(own_stack, admin, late_id))["status"] == "done"

    await until(late_ended, 30, "run 39 done")
    versions = (await client.get("/v1/admin/registry", headers=admin)).json()["versions"]
    states = {v["version"]: (v["channel"], v["weight"], v["enabled"]) for v in versions if v["name"] == "sketch"}
    # The stepped-down candidate is disabled too: no worker or explainer keeps it loaded.
    assert {v: states[v] for v in (39, 40, 41, 42, 43)} == {
        39: ("shadow", 0, True),
        40: ("shadow", 0, True),
        41: ("shadow", 0, True),
        42: ("canary", 0, False),
        43: ("shadow", 0, True),
    }, states
    changes = (await client.get("/v1/admin/registry/changes", params={"model": "sketch"}, headers=admin)).json()
    stepped_down = {(c["version"], c["actor"]) for c in changes["data"] if c["action"] == "channel_canary"}
    assert stepped_down == {(41, f"training run {run_ids[42]}"), (42, f"training run {run_ids[43]}")}


async def test_a_candidate_an_admin_is_promoting_is_not_stepped_down(own_stack: Stack) -> None:
    """A newer candidate's end steps the older candidates down while an admin promotes one of
    them: the step-down waits for the promotion and leaves the new stable version as it is."""
    from api.app.registry import service as registry_service
    from contracts.registry import load_registry

    base = next(m for m in load_registry(own_stack.app.state.settings.registry_path).models if m.key == "sketch@1")
    run_actor = registry_service.Actor(None, f"{training_service.RUN_ACTOR_PREFIX}{uuid.uuid4()}")
    async with own_stack.app.state.sessionmaker() as session:
        for version in (51, 52):
            entry = base.model_copy(update={"version": version, "channel": "shadow", "training": {"run": "r"}})
            await registry_service.register_version(session=session, actor=run_actor, entry=entry, reason="trained")
    admin = registry_service.Actor(None, "admin@example.com")
    async with own_stack.app.state.sessionmaker() as promoting, own_stack.app.state.sessionmaker() as ending:
        # The admin's promotion holds the registry's lock, not committed yet.
        await promoting.execute(registry_service.REGISTRY_LOCK)
        step_down = asyncio.create_task(
            training_service.step_down_older_shadows(session=ending, actor=run_actor, name="sketch", version=52)
        )
        await asyncio.sleep(1.0)
        assert not step_down.done()
        await registry_service.promote(
            session=promoting, actor=admin, name="sketch", version=51, reason="looks good", available={"sketch@51"}
        )
        assert await asyncio.wait_for(step_down, 30) == []
    versions = (
        await own_stack.client.get(
            "/v1/admin/registry", headers=await login(own_stack.client, ADMIN_EMAIL, ADMIN_PASSWORD)
        )
    ).json()["versions"]
    states = {v["version"]: (v["channel"], v["enabled"]) for v in versions if v["name"] == "sketch"}
    assert (states[51], states[52]) == (("stable", True), ("shadow", True)), states


def test_the_trigger_retrains_with_its_base_versions_recipe(settings: Settings) -> None:
    """A run the trigger starts from sketch@3 trains as sketch@3 was trained (its registry entry's
    ``training`` block), for RETRAIN_EPOCHS: a compact CNN's candidate would only ever compare
    worse. A block that is no valid recipe gives the defaults."""
    from contracts.registry import load_registry
    from contracts.training import TrainingOptions

    registry = load_registry(settings.registry_path)
    stable = registry.find("sketch", 3, benchmark_mode=False)
    assert stable is not None and stable.training is not None
    options = training_service.recipe(stable, epochs=2)
    assert (options.arch, options.batch_size, options.epochs) == ("vgg", stable.training["batch_size"], 2)
    assert options.mixed_precision and options.flip_average
    broken = stable.model_copy(update={"training": {"arch": "vgg", "batch_size": 3}})
    assert training_service.recipe(broken, epochs=2) == TrainingOptions(epochs=2)
    assert training_service.recipe(None, epochs=5) == TrainingOptions(epochs=5)


def test_a_retrained_versions_name_fits_however_long_its_bases() -> None:
    """A base version named up to the limit: its retrained version's entry is still valid (it
    once failed validation, and the run was never registered)."""
    from contracts.registry import ModelEntry

    base = ModelEntry.model_validate(
        {
            "name": "sketch",
            "version": 16,
            "display_name": "L" * 200,
            "runtime": "keras",
            "file": "{trained_dir}/sketch/v2/model.keras",
            "labels": "{trained_dir}/sketch/v2/labels.txt",
            "input": {"height": 28, "width": 28, "mode": "L"},
            "preprocessing": "sketch",
        }
    )
    entry = training_service.trained_entry(a_run(17, status="done", base=16), base)
    assert entry.display_name is not None and len(entry.display_name) == 200
    assert entry.display_name.endswith("L… (v17, retrained)"), entry.display_name
    short = training_service.trained_entry(
        a_run(18, status="done", base=16), base.model_copy(update={"display_name": "Sketch"})
    )
    assert short.display_name == "Sketch (v18, retrained)"
    # Retrained from a retrained version: named after the original, not after the chain.
    again = training_service.trained_entry(a_run(19, status="done", base=18), short)
    assert again.display_name == "Sketch (v19, retrained)"


async def test_a_cancel_that_meets_a_run_just_ended_answers_409_and_marks_nothing(own_stack: Stack) -> None:
    """The trainer's end is applied on another connection: a cancel whose session still holds the
    run as running must read it afresh, not mark an ended run as being cancelled."""
    redis = own_stack.app.state.redis
    async with own_stack.app.state.sessionmaker() as session, own_stack.app.state.sessionmaker() as other:
        run = a_run(60, status="running", base=1, started_at=datetime.now(UTC))
        session.add(run)
        await session.commit()  # ``session`` keeps the run, as running, in its identity map
        run_id = run.id
        ended = await other.get(TrainingRun, run_id)
        assert ended is not None
        ended.status, ended.finished_at = "done", datetime.now(UTC)
        await other.commit()
        with pytest.raises(HTTPException) as refused:
            await training_service.cancel_run(session=session, redis=redis, run_id=run_id)
        assert refused.value.status_code == 409 and "done" in str(refused.value.detail)
        await session.rollback()
    async with own_stack.app.state.sessionmaker() as session:
        again = await session.get(TrainingRun, run_id)
        assert again is not None and (again.status, again.cancel_requested_at) == ("done", None)
    # The trainer has reported the end, not yet applied to the row: too late as well.
    async with own_stack.app.state.sessionmaker() as session:
        reported = a_run(61, status="running", base=1, started_at=datetime.now(UTC))
        session.add(reported)
        await session.commit()
        reported_id = reported.id
        await redis.set(training.ended_key(str(reported_id)), "done")
        with pytest.raises(HTTPException) as refused:
            await training_service.cancel_run(session=session, redis=redis, run_id=reported_id)
        assert refused.value.status_code == 409 and "being recorded" in str(refused.value.detail)
        await session.rollback()
    async with own_stack.app.state.sessionmaker() as session:
        again = await session.get(TrainingRun, reported_id)
        assert again is not None and again.cancel_requested_at is None
    assert not await redis.exists(training.cancel_key(str(reported_id)))


async def test_the_auto_promote_rule_leaves_what_it_cannot_judge_to_an_admin(own_stack: Stack) -> None:
    """Versions no longer registered, never served within the wait, or trained from another base
    than the stable version (their held-out figures are not comparable) are not promoted, with
    why; a run still within its wait stays undecided."""
    client = own_stack.client
    admin = await login(client, ADMIN_EMAIL, ADMIN_PASSWORD)
    for version in (4, 5, 6, 7, 8):
        r = await client.post(
            "/v1/admin/registry/versions",
            json={
                "name": "sketch",
                "channel": "shadow",
                "runtime": "keras",
                "file": "{trained_dir}/sketch/v2/model.keras",
                "labels": "{trained_dir}/sketch/v2/labels.txt",
                "input": {"height": 28, "width": 28, "mode": "L"},
                "preprocessing": "sketch",
                "reason": "a candidate no worker serves here",
            },
            headers=admin,
        )
        assert r.status_code == 201 and r.json()["version"] == version, r.text

    def done_run(version: int, minutes_ago: float, base: int = 3) -> TrainingRun:
        finished = datetime.now(UTC) - timedelta(minutes=minutes_ago)
        return a_run(version, status="done", base=base, record={"test_accuracy": 0.9}, finished_at=finished)

    # Finished 90 s ago: past the 60 s wait, within the two waits the rule looks back.
    gone, unserved, waiting = done_run(50, 1.5), done_run(4, 1.5), done_run(5, 0)
    elsewhere, moved, stepped_down = done_run(6, 0, base=1), done_run(7, 0), done_run(8, 0)
    r = await client.patch(
        "/v1/admin/registry/models/sketch/versions/7", json={"channel": "canary", "reason": "not yet"}, headers=admin
    )
    assert r.status_code == 200, r.text
    # 8 was stepped down by a newer run; an admin changing it since (enabled again) did not move it.
    from api.app.registry import service as registry_service

    async with own_stack.app.state.sessionmaker() as session:
        await registry_service.set_channel(
            session=session,
            actor=registry_service.Actor(None, "training run 1234"),
            name="sketch",
            version=8,
            channel="canary",
            enabled=False,
            reason="superseded",
            available=set(),
        )
    r = await client.patch(
        "/v1/admin/registry/models/sketch/versions/8", json={"enabled": True, "reason": "look again"}, headers=admin
    )
    assert r.status_code == 200, r.text
    async with own_stack.app.state.sessionmaker() as session:
        session.add_all([gone, unserved, waiting, elsewhere, moved, stepped_down])
        await session.commit()
        decided = await training_service.auto_promote(session=session, availability={}, margin=0.02, wait_seconds=60)
        assert {run.version: run.promotion for run in decided} == {
            50: "not promoted: the version is no longer registered",
            4: "not promoted: no worker served it within 60 s; left to an admin",
            6: "not promoted: trained from @1, the stable version is @3; left to an admin",
            7: f"not promoted: it was moved to canary first, by {ADMIN_EMAIL}",
            8: "not promoted: it was moved to canary first, by a newer training run (training run 1234)",
        }
        await session.refresh(waiting)
        assert waiting.promotion is None
    versions = (await client.get("/v1/admin/registry", headers=admin)).json()["versions"]
    assert next(v for v in versions if v["name"] == "sketch" and v["version"] == 4)["channel"] == "shadow"


@pytest.mark.parametrize("own_stack", [{"result_claim_idle_seconds": 1.0}], indirect=True)
async def test_a_run_whose_version_was_taken_meanwhile_fails_saying_so(own_stack: Stack) -> None:
    """The run's version number is taken when it ends (a registration refuses a number a run
    holds, but a registry restored from a backup, say, may hold it): the run's end is recorded as
    failed with why (it stayed ``running``, blocking every run of the model), and the end is
    handled although the API process that read it died before acknowledging it (an event left
    pending is claimed again)."""
    from tests.api.test_registry import SKETCH_NEW

    redis = own_stack.app.state.redis
    admin = await login(own_stack.client, ADMIN_EMAIL, ADMIN_PASSWORD)
    r = await own_stack.client.post("/v1/admin/registry/versions", json={**SKETCH_NEW, "version": 90}, headers=admin)
    assert r.status_code == 201, r.text
    async with own_stack.app.state.sessionmaker() as session:
        run = a_run(90, status="running", base=3, started_at=datetime.now(UTC))
        session.add(run)
        await session.commit()
        run_id = str(run.id)

    async def group_ready() -> bool:
        groups = await redis.xinfo_groups(training.EVENT_STREAM) if await redis.exists(training.EVENT_STREAM) else []
        return any(g["name"] in (training.EVENT_GROUP, training.EVENT_GROUP.encode()) for g in groups)

    await redis.xadd(training.EVENT_STREAM, training.TrainingEvent(run_id=run_id, kind="started").to_fields())
    await until(group_ready, 30, "the API's training event group")
    done = training.TrainingEvent(run_id=run_id, kind="done", record={"test_accuracy": 0.5})
    await redis.set(training.ended_key(run_id), "done")  # as the trainer does before it says so
    # Read by a process that dies before acknowledging it: in one transaction, so that the API's
    # own reader, blocked on the stream, never gets it first.
    async with redis.pipeline(transaction=True) as pipe:
        pipe.xadd(training.EVENT_STREAM, done.to_fields())
        pipe.xreadgroup(training.EVENT_GROUP, "api-gone-1", {training.EVENT_STREAM: ">"}, count=10)
        await pipe.execute()

    async def ended() -> bool:
        return (await run_of(own_stack, admin, run_id))["status"] != "running"

    await until(ended, 30, "the run's end")
    failed = await run_of(own_stack, admin, run_id)
    assert failed["status"] == "failed" and "sketch@90 was not registered" in failed["error"], failed
    pending = await redis.xpending(training.EVENT_STREAM, training.EVENT_GROUP)
    assert pending["pending"] == 0, pending


async def test_a_base_version_its_workers_cannot_serve_is_409_with_why_not_503(own_stack: Stack) -> None:
    """A run from a version the workers report as not trained on this server: 409 with their
    reason, not a 503 whose "retry shortly" could never come true. Without any worker's word, the
    labels may still come: 503 with Retry-After."""
    from contracts import workers
    from contracts.messages import NOT_TRAINED_YET, Heartbeat, ModelState

    admin = await login(own_stack.client, ADMIN_EMAIL, ADMIN_PASSWORD)
    body = {"model": "sketch", "base_version": 2, "options": {"epochs": 1}, "reason": "from v2"}
    r = await own_stack.client.post("/v1/admin/training-runs", json=body, headers=admin)
    assert r.status_code == 503 and r.headers["Retry-After"], r.text

    # A worker's heartbeat, as ``model.worker`` announces it, on a version whose file is missing.
    beat = Heartbeat(
        worker_id="w-no-sketch",
        pid=1,
        hostname="test",
        started_at=time.time(),
        models=[ModelState(name="sketch", version=2, ready=False, reason=f"{NOT_TRAINED_YET}: no file")],
    )
    redis = own_stack.app.state.redis
    async with redis.pipeline(transaction=True) as pipe:
        workers.announce(
            pipe, worker_id=beat.worker_id, heartbeat_json=beat.model_dump_json(), ttl_ms=60_000, now=time.time()
        )
        await pipe.execute()

    async def refused_with_why() -> bool:
        r = await own_stack.client.post("/v1/admin/training-runs", json=body, headers=admin)
        return r.status_code == 409 and NOT_TRAINED_YET in r.json()["detail"] and "sketch@2" in r.json()["detail"]

    await until(refused_with_why, 15, "a 409 naming why sketch@2 is not served")


async def test_a_run_from_a_retired_version_reads_its_labels_from_postgresql(own_stack: Stack) -> None:
    """A retired base version's Redis labels went (a week after its last worker, or with Redis's
    data): the labels PostgreSQL kept are used, instead of a 503 whose retry could never help."""
    from sqlalchemy import update

    from api.app.registry.models import ModelVersion

    six = ["apple", "bicycle", "cat", "diamond", "eye", "fish"]
    async with own_stack.app.state.sessionmaker() as session:
        await session.execute(
            update(ModelVersion).where(ModelVersion.name == "sketch", ModelVersion.version == 2).values(labels=six)
        )
        await session.commit()
    admin = await login(own_stack.client, ADMIN_EMAIL, ADMIN_PASSWORD)
    r = await own_stack.client.patch(
        "/v1/admin/registry/models/sketch/versions/2",
        json={"channel": "retired", "reason": "superseded"},
        headers=admin,
    )
    assert r.status_code == 200, r.text
    body = {"model": "sketch", "base_version": 2, "options": {"epochs": 1}, "reason": "from the retired v2"}
    r = await own_stack.client.post("/v1/admin/training-runs", json=body, headers=admin)
    assert r.status_code == 202 and r.json()["categories"] == six, r.text


async def test_a_queued_run_whose_job_was_lost_is_failed_not_left_blocking(own_stack: Stack) -> None:
    """Redis lost ``training:jobs`` (or the trainer that read a job stopped before it began): the
    run, queued for over a minute with no job a trainer can still read, is failed with why, and
    its model can be trained again. A run whose job still waits stays queued."""
    redis = own_stack.app.state.redis
    long_ago = datetime.now(UTC) - timedelta(minutes=5)
    async with own_stack.app.state.sessionmaker() as session:
        lost, waiting, young = (a_run(v, status="queued", base=1, created_at=long_ago) for v in (70, 71, 72))
        young.created_at = datetime.now(UTC)
        ids = {name: str(run.id) for name, run in (("lost", lost), ("waiting", waiting), ("young", young))}
        job = training.TrainingJob(
            run_id=ids["waiting"], model="sketch", version=71, categories=["cat"], options=training.TrainingOptions()
        )
        await redis.xadd(training.JOB_STREAM, job.to_fields())  # first: the API's own check may come any time
        session.add_all([lost, waiting, young])
        await session.commit()
        # The API's own check may come first: either way, only the lost run is failed.
        await training_service.fail_lost(session=session, redis=redis)
    admin = await login(own_stack.client, ADMIN_EMAIL, ADMIN_PASSWORD)
    failed = await run_of(own_stack, admin, ids["lost"])
    assert failed["status"] == "failed" and "job was lost" in failed["error"], failed
    assert (await run_of(own_stack, admin, ids["waiting"]))["status"] == "queued"
    assert (await run_of(own_stack, admin, ids["young"]))["status"] == "queued"

    # Once a trainer has read the waiting job (its group moved past it) and never began it: lost too.
    await redis.xgroup_create(training.JOB_STREAM, training.JOB_GROUP, id="0")
    await redis.xreadgroup(training.JOB_GROUP, "trainer-gone", {training.JOB_STREAM: ">"}, count=10)
    async with own_stack.app.state.sessionmaker() as session:
        await training_service.fail_lost(session=session, redis=redis)
    assert (await run_of(own_stack, admin, ids["waiting"]))["status"] == "failed"
    assert (await run_of(own_stack, admin, ids["young"]))["status"] == "queued"


async def test_the_feedback_exports_of_ended_runs_are_removed(own_stack: Stack) -> None:
    """Each run exports the labelled examples it trains on; once it ended (done, failed or
    cancelled) its folder goes, so exports do not pile up with every retraining. A running or
    queued run's stays, as does a folder no run names until it is an hour old (its run may be
    exporting it now), and what is not a run's."""
    data_dir = own_stack.app.state.settings.training_data_dir
    async with own_stack.app.state.sessionmaker() as session:
        runs = {
            status: a_run(80 + i, status=status, base=1)
            for i, status in enumerate((*training_service.UNFINISHED, "done", "failed", "cancelled"))
        }
        session.add_all(runs.values())
        await session.commit()
        orphan_young, orphan_old = uuid.uuid4(), uuid.uuid4()
        # Names a UUID can be read from but the portal never writes: not its folders.
        others = ["notes", uuid.uuid4().hex, f"{{{uuid.uuid4()}}}", f"urn:uuid:{uuid.uuid4()}"]
        for name in [*(str(r.id) for r in runs.values()), str(orphan_young), str(orphan_old), *others]:
            (data_dir / name / "cat").mkdir(parents=True)
            (data_dir / name / "cat" / "1.png").write_bytes(b"png")
        hours_ago = time.time() - 2 * 3600
        for name in [str(orphan_old), *others]:
            os.utime(data_dir / name, (hours_ago, hours_ago))
        # A link named as a run, to a folder elsewhere: neither it nor what it points at is removed.
        elsewhere = data_dir.parent / "elsewhere"
        elsewhere.mkdir()
        (data_dir / str(uuid.uuid4())).symlink_to(elsewhere, target_is_directory=True)
        removed = await training_service.remove_exports(session=session, data_dir=data_dir)
    kept = [str(runs["queued"].id), str(runs["running"].id), str(orphan_young), *others]
    assert sorted(p.name for p in data_dir.iterdir() if not p.is_symlink()) == sorted(kept)
    assert elsewhere.is_dir() and removed <= 4  # the three ended runs' and the old orphan's


async def test_a_quick_run_is_compared_on_the_stable_versions_held_out_drawings(
    own_stack: Stack, trained_dir: Path
) -> None:
    """A run on 50 drawings per category for one epoch is scored on the 6,000 held-out drawings the
    stable 20-class version was scored on, so its far lower accuracy compares worse and promoting
    it without force is refused. Scored on a held-out set of its own, nothing was compared and it
    replaced the stable version."""
    client = own_stack.client
    admin = await login(client, ADMIN_EMAIL, ADMIN_PASSWORD)
    await own_stack.start_workers(1, SERVE_MODELS="sketch", TRAINED_DIR=str(trained_dir))
    start_trainer(own_stack, trained_dir)
    quick = {"arch": "compact", "epochs": 1, "per_category": 50}
    body = {"model": "sketch", "base_version": 3, "options": quick, "reason": "a quick try"}
    r = await client.post("/v1/admin/training-runs", json=body, headers=admin)
    assert r.status_code == 202, r.text
    run = r.json()

    async def done() -> bool:
        now = await run_of(own_stack, admin, run["id"])
        assert now["status"] in ("queued", "running", "done"), now
        return bool(now["status"] == "done")

    await until(done, 180, "the quick run finished")
    record = (await run_of(own_stack, admin, run["id"]))["record"]
    assert record["per_category"] == 50 and record["samples"]["test"] == 6000, record["samples"]
    candidate = f"sketch@{run['version']}"

    async def served_with_its_record() -> bool:
        state = (await own_stack.app.state.workers.availability(fresh=True)).get(candidate)
        return state is not None and state.heldout_accuracy is not None

    await until(served_with_its_record, 90, f"the worker reports {candidate}'s held-out accuracy")
    pair = {"candidate": run["version"], "baseline": 3}
    comparison = (await client.get("/v1/admin/registry/models/sketch/compare", params=pair, headers=admin)).json()
    assert comparison["verdict"] == "worse", comparison
    # The stable version's own figure (94.1 % where it trained in bfloat16, 93.9 % in float32).
    stable = json.loads((trained_dir / "sketch" / "v3" / "metrics.json").read_text())["test_accuracy"]
    assert stable > 0.93
    assert comparison["reasons"][0].startswith(
        f"held-out accuracy: {record['test_accuracy'] * 100:.2f} % against {stable * 100:.2f} % (worse, margin 2 points)"
    ), comparison["reasons"]
    url = f"/v1/admin/registry/models/sketch/versions/{run['version']}/promote"
    r = await client.post(url, json={"reason": "try promote"}, headers=admin)
    assert r.status_code == 409 and "compares worse" in r.json()["detail"], r.text
    stable = [v for v in (await client.get("/v1/admin/registry", headers=admin)).json()["versions"]]
    assert [v["version"] for v in stable if v["name"] == "sketch" and v["channel"] == "stable"] == [3]


async def test_the_trigger_leaves_photo_models_alone_and_says_a_refusal_once(
    own_stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    """mobilenet_v2 (a photo model, which no run trains) and sketch both have enough new labelled
    examples. Check after check, the trigger says nothing of mobilenet_v2, and why sketch's run
    cannot start (its labels are not known: no worker ever served it) once, not at every check."""
    import logging

    from sqlalchemy import select

    from api.app.examples.models import LabelledExample
    from api.app.training import background as training_background
    from api.app.users.models import User
    from tests.api.test_metrics import runtime_of

    async with own_stack.app.state.sessionmaker() as session:
        owner = await session.scalar(select(User.id).where(User.email == ADMIN_EMAIL))
        assert owner is not None
        for model in ("mobilenet_v2", "sketch"):
            for i in range(3):
                session.add(
                    LabelledExample(
                        model_name=model,
                        sha256=uuid.uuid4().hex * 2,
                        label=f"label{i}",
                        split="train",
                        source="ground_truth",
                        owner_id=owner,
                    )
                )
        await session.commit()
    caplog.set_level(logging.INFO, logger="api.training")
    # The app's own trigger is off (RETRAIN_MIN_NEW_LABELS 0): only these checks say anything.
    rt = runtime_of(own_stack.app)
    rt.settings = rt.settings.model_copy(update={"retrain_min_new_labels": 2})
    refusals: dict[str, str] = {}
    for _ in range(3):
        await training_background.maintain_once(rt, refusals)
    said = [r.getMessage() for r in caplog.records if r.name == "api.training" and "retraining" in r.getMessage()]
    assert not [line for line in said if "mobilenet_v2" in line], said
    refused = [line for line in said if line.startswith("retraining sketch not started")]
    assert len(refused) == 1, said
    assert "labels of sketch@3 are not known" in refused[0], said


async def test_training_runs_are_listed_a_page_at_a_time(own_stack: Stack) -> None:
    """``GET /v1/admin/training-runs`` pages as the other admin lists do: ``skip`` and ``limit``
    (default 50, at most 200), newest first, with ``count``; bad values are 422."""
    client = own_stack.client
    admin = await login(client, ADMIN_EMAIL, ADMIN_PASSWORD)
    now = datetime.now(UTC)
    async with own_stack.app.state.sessionmaker() as session:
        for i in range(55):
            session.add(a_run(100 + i, status="failed", base=1, created_at=now - timedelta(seconds=100 - i)))
        for i in range(2):
            other = a_run(100 + i, status="failed", base=1, created_at=now - timedelta(seconds=200 + i))
            other.model_name = "birds"
            session.add(other)
        await session.commit()
    url = "/v1/admin/training-runs"

    async def listed(**params: Any) -> dict[str, Any]:
        r = await client.get(url, params=params, headers=admin)
        assert r.status_code == 200, r.text
        return dict(r.json())

    first = await listed()
    assert first["count"] == 57 and len(first["data"]) == 50
    assert [run["version"] for run in first["data"]] == list(range(154, 104, -1))
    page = await listed(model="sketch", skip=40, limit=20)
    assert page["count"] == 55 and [run["version"] for run in page["data"]] == list(range(114, 99, -1))
    seen = [run["id"] for skip in range(0, 57, 20) for run in (await listed(skip=skip, limit=20))["data"]]
    assert len(seen) == len(set(seen)) == 57
    assert (await listed(model="birds", limit=200))["count"] == 2
    for bad in ({"limit": 0}, {"limit": 201}, {"skip": -1}, {"skip": 10_001}, {"limit": "many"}):
        r = await client.get(url, params=bad, headers=admin)
        assert r.status_code == 422, (bad, r.text)


async def test_an_epoch_delivered_again_is_counted_once(own_stack: Stack) -> None:
    """Training events come at least once (an acknowledgement lost after the run's commit delivers
    the event again): a run at epoch 1 read "epoch 2" with [1, 1] as its history, and ended
    "5 of 4"."""
    sessions = own_stack.app.state.sessionmaker
    async with sessions() as session:
        run = a_run(71, status="running", base=1, started_at=datetime.now(UTC))
        session.add(run)
        await session.commit()
        run_id = str(run.id)

    def epoch(n: int, loss: float | None = None) -> training.TrainingEvent:
        numbers: dict[str, float | None] = {
            "epoch": float(n),
            "seconds": 10.0 * n,
            "loss": 1.0 / n if loss is None else loss,
            "accuracy": 0.5,
        }
        return training.TrainingEvent(run_id=run_id, kind="epoch", epoch=n, epochs=4, numbers=numbers)

    for event in (epoch(1), epoch(1), epoch(2), epoch(1), epoch(2), epoch(3)):
        async with sessions() as session:
            await training_service.apply_event(session=session, event=event)
    async with sessions() as session:
        stored = await session.get(TrainingRun, uuid.UUID(run_id))
        assert stored is not None
        assert [entry["epoch"] for entry in stored.history] == [1, 2, 3], stored.history

    # An epoch whose loss diverged (NaN, which JSON and JSONB do not hold) reads as null, and the
    # run stays readable (it answered 500 once its history held one).
    async with sessions() as session:
        await training_service.apply_event(session=session, event=epoch(4, loss=float("nan")))
    admin = await login(own_stack.client, ADMIN_EMAIL, ADMIN_PASSWORD)
    read = await run_of(own_stack, admin, run_id)
    assert [entry["loss"] for entry in read["history"]][3:] == [None] and read["epoch"] == 4, read


async def test_steps_within_an_epoch_move_the_progress_and_eta_and_a_late_report_moves_nothing_back(
    own_stack: Stack,
) -> None:
    """The ETA came from finished epochs only (40 s to minutes each): none during the first epoch,
    and frozen within each. The trainer's step reports move it, counting the epoch in progress by
    its steps; a report that arrives late (delivered again, or after its epoch's end) changes
    nothing."""
    sessions = own_stack.app.state.sessionmaker
    async with sessions() as session:
        run = a_run(72, status="running", base=1, started_at=datetime.now(UTC))
        run.options = {"epochs": 4}
        session.add(run)
        await session.commit()
        run_id = str(run.id)
    admin = await login(own_stack.client, ADMIN_EMAIL, ADMIN_PASSWORD)

    def progress(epoch: int, step: int, seconds: float) -> training.TrainingEvent:
        return training.TrainingEvent(
            run_id=run_id, kind="progress", epoch=epoch, epochs=4, step=step, steps=100, numbers={"seconds": seconds}
        )

    def epoch(n: int, seconds: float) -> training.TrainingEvent:
        numbers: dict[str, float | None] = {"epoch": float(n), "seconds": seconds, "loss": 0.5, "accuracy": 0.5}
        return training.TrainingEvent(run_id=run_id, kind="epoch", epoch=n, epochs=4, numbers=numbers)

    async def shown(*events: training.TrainingEvent) -> tuple[int, int | None, int | None, float | None]:
        for event in events:
            async with sessions() as session:
                await training_service.apply_event(session=session, event=event)
        read = await run_of(own_stack, admin, run_id)
        return read["epoch"], read["step"], read["steps"], read["eta_seconds"]

    assert await shown() == (0, None, None, None)
    # A tenth of the first epoch in 5 s: 0.025 of the run, so 195 s left.
    assert await shown(progress(1, 10, 5.0)) == (0, 10, 100, 195.0)
    # Half of it in 25 s: 175 s left. The report of step 10 delivered again after it moves nothing.
    assert await shown(progress(1, 50, 25.0), progress(1, 10, 5.0), progress(1, 50, 25.0)) == (0, 50, 100, 175.0)
    # The epoch ends at 50 s (150 s left); a report of its step 90 arriving after that is stale.
    assert await shown(epoch(1, 50.0)) == (1, None, None, 150.0)
    assert await shown(progress(1, 90, 45.0)) == (1, None, None, 150.0)
    assert await shown(progress(2, 50, 75.0), progress(1, 99, 49.0)) == (1, 50, 100, 125.0)
    async with sessions() as session:
        stored = await session.get(TrainingRun, uuid.UUID(run_id))
        assert stored is not None
        assert stored.progress == {"epoch": 2, "step": 50, "steps": 100, "seconds": 75.0}
        assert [entry["epoch"] for entry in stored.history] == [1]
    # Every epoch trained: it evaluates, which the estimate does not cover (it said 0 s left).
    assert await shown(epoch(2, 100.0), epoch(3, 150.0), epoch(4, 200.0)) == (4, None, None, None)
    # Ended: its error says where it stopped.
    cancelled = training.TrainingEvent(
        run_id=run_id, kind="cancelled", error="cancelled while evaluating, after its last epoch"
    )
    assert await shown(cancelled) == (4, None, None, None)
