"""The retraining loop over time: a model whose version numbers ran out, runs that failed or were
cancelled and are tried again after a wait, and the former stable versions the auto-promote rule
leaves behind promotion after promotion."""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from api.app.catalog.service import ModelAvailability
from api.app.examples.models import LabelledExample
from api.app.registry import service as registry_service
from api.app.registry.models import ModelVersion
from api.app.training import background as training_background
from api.app.training import service as training_service
from api.app.training.models import TrainingRun
from api.app.users.models import User
from contracts import training
from contracts.registry import MAX_VERSION, load_registry
from tests.api.conftest import Stack
from tests.api.test_metrics import runtime_of
from tests.api.test_registry import SKETCH_NEW
from tests.api.test_training import a_run
from tests.conftest import ADMIN_EMAIL, ADMIN_PASSWORD, login

TWENTY = [f"class{i}" for i in range(20)]


async def _labels_known(stack: Stack) -> None:
    """sketch@3's labels as a worker would have published them (PostgreSQL keeps them): runs from
    it can be queued with no worker running."""
    async with stack.app.state.sessionmaker() as session:
        await session.execute(
            update(ModelVersion).where(ModelVersion.name == "sketch", ModelVersion.version == 3).values(labels=TWENTY)
        )
        await session.commit()


async def _new_examples(stack: Stack, count: int) -> None:
    """``count`` labelled train examples of sketch, labelled now (no image stored: left out of the
    export, counted by the trigger)."""
    async with stack.app.state.sessionmaker() as session:
        owner = await session.scalar(select(User.id).where(User.email == ADMIN_EMAIL))
        assert owner is not None
        for i in range(count):
            session.add(
                LabelledExample(
                    model_name="sketch",
                    sha256=uuid.uuid4().hex * 2,
                    label=TWENTY[i % 20],
                    split="train",
                    source="ground_truth",
                    owner_id=owner,
                )
            )
        await session.commit()


async def _runs(stack: Stack) -> list[TrainingRun]:
    async with stack.app.state.sessionmaker() as session:
        return await training_service.list_runs(session=session, model="sketch")


def _trigger_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "api.training" and "retraining" in r.getMessage()]


def _exports(data_dir: Path) -> list[str]:
    return sorted(p.name for p in data_dir.iterdir()) if data_dir.exists() else []


async def test_a_version_registered_at_the_limit_refuses_runs_before_they_export_or_train(
    own_stack: Stack, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sketch@1000000, registered by hand, leaves no number for a run's version: the run is
    refused at once (409, saying why and that it will not pass), with nothing exported; it was
    queued as sketch@1000001, trained to the end and failed at its registration, and so did every
    later run, the trigger's too. The trigger says so once, not at every check. Registered while
    a run exported its examples, or a folder at the limit in the model store: the same."""
    client = own_stack.client
    admin = await login(client, ADMIN_EMAIL, ADMIN_PASSWORD)
    data_dir = own_stack.app.state.settings.training_data_dir
    await _labels_known(own_stack)
    body = {"model": "sketch", "options": {"epochs": 1, "per_category": 10, "canvas_share": 0}, "reason": "x"}

    # A model store holding a folder numbered at the limit: the same refusal, saying so.
    redis = own_stack.app.state.redis
    await redis.hset(training.RECORDS_KEY, f"sketch/v{MAX_VERSION}", "{}")
    r = await client.post("/v1/admin/training-runs", json=body, headers=admin)
    assert r.status_code == 409, r.text
    assert f"the model store (TRAINED_DIR) holds sketch/v{MAX_VERSION}" in r.json()["detail"], r.text
    await redis.hdel(training.RECORDS_KEY, f"sketch/v{MAX_VERSION}")

    # Registered while the run's examples were being exported: refused once numbered, under the
    # registry's lock, and its export removed.
    export = training_service.export_examples

    async def registered_meanwhile(**kwargs: Any) -> Any:
        summary = await export(**kwargs)
        r = await client.post(
            "/v1/admin/registry/versions", json={**SKETCH_NEW, "version": MAX_VERSION, "reason": "max"}, headers=admin
        )
        assert r.status_code == 201, r.text
        return summary

    monkeypatch.setattr(training_service, "export_examples", registered_meanwhile)
    r = await client.post("/v1/admin/training-runs", json=body, headers=admin)
    assert r.status_code == 409 and "is registered" in r.json()["detail"], r.text
    assert await _runs(own_stack) == [] and _exports(data_dir) == []

    # Registered before: refused before anything is exported, by the route and the trigger alike.
    async def not_exported(**_: Any) -> Any:
        raise AssertionError("exported for a run that cannot be registered")

    monkeypatch.setattr(training_service, "export_examples", not_exported)
    r = await client.post("/v1/admin/training-runs", json=body, headers=admin)
    assert r.status_code == 409, r.text
    assert r.json()["detail"] == (
        f"sketch cannot be trained here any more: its next version would be sketch@{MAX_VERSION + 1}, and version "
        f"numbers go up to {MAX_VERSION} (sketch@{MAX_VERSION} is registered). A number is never given twice, and a "
        "registered version is never deleted or renumbered (a retired one keeps its number), so no run of it could "
        "register what it trains. To train on, register the version to start from under a new model name "
        "(POST /v1/admin/registry/versions) and train that model."
    )
    assert await _runs(own_stack) == [] and _exports(data_dir) == []

    # The trigger, check after check with enough new examples: no run, one line.
    await _new_examples(own_stack, 3)
    caplog.set_level(logging.INFO, logger="api.training")
    rt = runtime_of(own_stack.app)
    rt.settings = rt.settings.model_copy(update={"retrain_min_new_labels": 2})
    refusals: dict[str, str] = {}
    for _ in range(3):
        await training_background.maintain_once(rt, refusals)
    said = _trigger_lines(caplog)
    assert len(said) == 1 and said[0].startswith("retraining sketch not started: sketch cannot be trained"), said
    assert await _runs(own_stack) == [] and _exports(data_dir) == []


async def test_a_failed_or_cancelled_run_is_tried_again_after_a_growing_wait(
    own_stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    """Examples a run failed on (its trainer killed, say) are still new: once RETRY_AFTER has
    passed since the failure, the trigger starts another run for them; after a second one that
    ends badly it waits twice as long. The failed run used them up: no run started again until
    as many more were labelled. A run that ended done uses them up, as before."""
    await _labels_known(own_stack)
    await _new_examples(own_stack, 3)
    rt = runtime_of(own_stack.app)
    rt.settings = rt.settings.model_copy(update={"retrain_min_new_labels": 3})
    caplog.set_level(logging.INFO, logger="api.training")
    refusals: dict[str, str] = {}
    # Queued after the examples were labelled, then failed as its trainer was killed.
    now = datetime.now(UTC)
    failed = a_run(4, status="failed", base=3, created_at=now, finished_at=now)
    failed.trigger, failed.error = "auto", training_service.TRAINER_STOPPED
    async with own_stack.app.state.sessionmaker() as session:
        session.add(failed)
        await session.commit()
        assert await training_service.new_examples_since_last_run(session=session, name="sketch") == 3

    # Within the wait: nothing started, and said once.
    for _ in range(2):
        await training_background.maintain_once(rt, refusals)
    assert [r.id for r in await _runs(own_stack)] == [failed.id]
    said = _trigger_lines(caplog)
    assert len(said) == 1 and said[0].startswith(f"retraining sketch not started: its run {failed.id} failed at"), said
    assert said[0].endswith(
        f"the next starts from {now + training_service.RETRY_AFTER:%Y-%m-%d %H:%M:%S} UTC "
        "(an admin may start one at any time)"
    ), said

    async def ended_ago(run_id: uuid.UUID, ago: timedelta) -> None:
        async with own_stack.app.state.sessionmaker() as session:
            await session.execute(
                update(TrainingRun).where(TrainingRun.id == run_id).values(finished_at=datetime.now(UTC) - ago)
            )
            await session.commit()

    # The wait is over: a run for the same examples.
    await ended_ago(failed.id, training_service.RETRY_AFTER + timedelta(seconds=5))
    await training_background.maintain_once(rt, refusals)
    again = (await _runs(own_stack))[0]
    assert (again.trigger, again.status, again.version) == ("auto", "queued", 5), again
    assert again.reason == "3 new labelled examples since the last run"

    # Cancelled too: the second in a row, so the wait is twice as long.
    async with own_stack.app.state.sessionmaker() as session:
        await training_service.cancel_run(session=session, redis=own_stack.app.state.redis, run_id=again.id)
    await ended_ago(again.id, training_service.RETRY_AFTER + timedelta(minutes=30))
    await training_background.maintain_once(rt, refusals)
    assert len(await _runs(own_stack)) == 2
    assert "(2 runs in a row failed or were cancelled)" in _trigger_lines(caplog)[-1], _trigger_lines(caplog)
    await ended_ago(again.id, 2 * training_service.RETRY_AFTER + timedelta(seconds=5))
    await training_background.maintain_once(rt, refusals)
    third = (await _runs(own_stack))[0]
    assert (third.trigger, third.status, third.version) == ("auto", "queued", 6), third

    # One that ended done used the examples: none are new since it was queued.
    async with own_stack.app.state.sessionmaker() as session:
        done = await session.get_one(TrainingRun, third.id)
        done.status, done.finished_at = "done", datetime.now(UTC)
        await session.commit()
        assert await training_service.new_examples_since_last_run(session=session, name="sketch") == 0
        assert await training_service.retry_refusal(session=session, name="sketch") is None


async def test_examples_a_run_cannot_learn_do_not_start_one(own_stack: Stack) -> None:
    """Examples labelled a category the stable version does not have (confirmed answers of a
    version registered with labels of its own, say) are skipped by a run from it: enough of them
    start no run, which would train on none of them. Enough that it can learn do."""
    await _labels_known(own_stack)
    rt = runtime_of(own_stack.app)
    rt.settings = rt.settings.model_copy(update={"retrain_min_new_labels": 3})

    async def labelled(*labels: str) -> None:
        async with own_stack.app.state.sessionmaker() as session:
            owner = await session.scalar(select(User.id).where(User.email == ADMIN_EMAIL))
            assert owner is not None
            for label in labels:
                session.add(
                    LabelledExample(
                        model_name="sketch",
                        sha256=uuid.uuid4().hex * 2,
                        label=label,
                        split="train",
                        source="ground_truth",
                        owner_id=owner,
                    )
                )
            await session.commit()

    await labelled("giraffe", "giraffe", "zebra", TWENTY[0])
    await training_background.maintain_once(rt, {})
    assert await _runs(own_stack) == []
    await labelled(TWENTY[1], TWENTY[2])
    refusals: dict[str, str] = {}
    await training_background.maintain_once(rt, refusals)
    assert not refusals, refusals
    [run] = await _runs(own_stack)
    assert (run.trigger, run.reason) == ("auto", "3 new labelled examples since the last run"), run


async def test_an_admins_runs_and_a_stopped_trainer_do_not_hold_the_trigger_back(own_stack: Stack) -> None:
    """Runs an admin started that failed (their own options, base or data) and a run of the
    trigger's whose trainer was told to stop (a deploy) say nothing of the trigger's next run: it
    may start at once. Counted, three of them held the trigger back for 4 hours."""
    now = datetime.now(UTC)
    experiments = [a_run(v, status="failed", base=3, created_at=now, finished_at=now, error="x") for v in (4, 5)]
    experiments.append(a_run(6, status="cancelled", base=3, created_at=now, finished_at=now))
    redeployed = a_run(7, status="failed", base=3, created_at=now, finished_at=now, error=training.STOPPED)
    redeployed.trigger = "auto"
    async with own_stack.app.state.sessionmaker() as session:
        session.add_all([*experiments, redeployed])
        await session.commit()
        assert await training_service.retry_refusal(session=session, name="sketch") is None
        # One of its own that failed for a reason of the run: the trigger waits.
        failed = a_run(8, status="failed", base=3, created_at=now, finished_at=now, error="out of memory")
        failed.trigger = "auto"
        session.add(failed)
        await session.commit()
        refusal = await training_service.retry_refusal(session=session, name="sketch")
        assert refusal is not None and f"its run {failed.id} failed" in refusal and "in a row" not in refusal, refusal


async def test_the_auto_promote_rule_keeps_only_the_version_it_replaced_enabled(own_stack: Stack) -> None:
    """Three candidates promoted one after another by the rule: the versions each promotion made
    canaries without traffic stayed enabled and loaded (3, 10 and 11 beside the stable 15). Now
    only the last one it replaced, the rollback target, stays enabled; the older ones it replaced
    are disabled, audited as the rule. A version an admin gave traffic, or changed since, and the
    canaries the rule never touched (sketch@1 and @2) are left alone."""
    client = own_stack.client
    admin = await login(client, ADMIN_EMAIL, ADMIN_PASSWORD)
    base = next(m for m in load_registry(own_stack.app.state.settings.registry_path).models if m.key == "sketch@3")
    served = ModelAvailability(workers=1, num_classes=20, heldout_accuracy=0.94, heldout_set="s", heldout_size=6000)
    keys = ("sketch@1", "sketch@2", "sketch@3", "sketch@10", "sketch@11", "sketch@15")
    availability = {key: served for key in keys}
    admin_actor = registry_service.Actor(None, ADMIN_EMAIL)

    async def states() -> dict[int, tuple[str, int, bool]]:
        versions = (await client.get("/v1/admin/registry", headers=admin)).json()["versions"]
        return {v["version"]: (v["channel"], v["weight"], v["enabled"]) for v in versions if v["name"] == "sketch"}

    async def trained_and_promoted(version: int, from_version: int) -> None:
        run_actor = registry_service.Actor(None, f"{training_service.RUN_ACTOR_PREFIX}{uuid.uuid4()}")
        entry = base.model_copy(update={"version": version, "channel": "shadow", "training": {"run": "r"}})
        run = a_run(
            version, status="done", base=from_version, record={"test_accuracy": 0.94}, finished_at=datetime.now(UTC)
        )
        run.trigger = "auto"
        async with own_stack.app.state.sessionmaker() as session:
            await registry_service.register_version(session=session, actor=run_actor, entry=entry, reason="trained")
            session.add(run)
            await session.commit()
            decided = await training_service.auto_promote(
                session=session, availability=availability, margin=0.02, wait_seconds=60
            )
        assert [(d.version, (d.promotion or "").split(":")[0]) for d in decided] == [(version, "promoted")], [
            d.promotion for d in decided
        ]

    await trained_and_promoted(10, 3)
    after_first = await states()
    assert after_first[3] == ("canary", 0, True) and after_first[10][0] == "stable", after_first
    # An admin gives the replaced version some traffic: it is theirs now.
    async with own_stack.app.state.sessionmaker() as session:
        await registry_service.set_weights(
            session=session, actor=admin_actor, name="sketch", weights={3: 5}, reason="a few", available={"sketch@3"}
        )
    await trained_and_promoted(11, 10)
    assert (await states())[3] == ("canary", 5, True)
    # ... and takes it back: still theirs, left enabled.
    async with own_stack.app.state.sessionmaker() as session:
        await registry_service.set_weights(
            session=session, actor=admin_actor, name="sketch", weights={3: 0}, reason="enough", available=set()
        )
    await trained_and_promoted(15, 11)
    final = await states()
    assert {v: final[v] for v in (1, 2, 3, 10, 11)} == {
        1: ("canary", 0, True),
        2: ("canary", 0, True),
        3: ("canary", 0, True),
        10: ("canary", 0, False),
        11: ("canary", 0, True),
    }, final
    assert final[15][0] == "stable" and final[15][2], final
    changes = (await client.get("/v1/admin/registry/changes", params={"model": "sketch"}, headers=admin)).json()
    disabled: list[dict[str, Any]] = [c for c in changes["data"] if c["action"] == "disable"]
    assert [(c["version"], c["actor"]) for c in disabled] == [(10, "auto-promote rule")], disabled
    assert "promoted sketch@15" in disabled[0]["reason"], disabled

    # Enabled again by an admin: the rule leaves it to them, also when it looks again.
    async with own_stack.app.state.sessionmaker() as session:
        await registry_service.set_channel(
            session=session,
            actor=admin_actor,
            name="sketch",
            version=10,
            channel=None,
            enabled=True,
            reason="look again",
            available={"sketch@10"},
        )
        assert await training_service.step_down_older_canaries(session=session, name="sketch", version=15) == []
