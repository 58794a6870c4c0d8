"""Comparing versions before a promotion: an offline evaluation runs both on the same images users
labelled, in the background, a few jobs at a time."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import event, func, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine

from api.app.catalog.service import ModelAvailability, weight_shares
from api.app.core.config import Settings
from api.app.core.db import make_engine, make_sessionmaker
from api.app.predictions import evaluations
from api.app.predictions.background import reconcile_once
from api.app.predictions.models import Evaluation, EvaluationAnswer, Job, Prediction
from api.app.registry import service as registry_service
from api.app.registry.live import build_registry
from api.app.registry.models import ModelVersion, RegistryChange
from api.app.releases import service as releases_service
from api.app.stats import service as stats_service
from contracts.messages import PredictionStatus
from contracts.registry import MAX_WEIGHT, load_registry
from tests.api.conftest import Stack, until
from tests.api.test_metrics import runtime_of
from tests.conftest import ADMIN_EMAIL, ADMIN_PASSWORD, PASSWORD, login
from tests.images import encode, noise_png
from tests.support import QUICKDRAW

PAIR = {"candidate": 2, "baseline": 1}
"""The two 6-class versions (the stable one, sketch@3, knows 20 categories)."""
IN_FLIGHT = 3


def canvas_drawings(category: str, count: int) -> list[bytes]:
    """Held-out QuickDraw drawings (the end of the file) as the canvas sends them: dark on white."""
    bitmaps = np.load(QUICKDRAW / f"{category}.npy", mmap_mode="r")[-count:]
    return [encode(Image.fromarray(255 - np.asarray(b, dtype=np.uint8).reshape(28, 28)), "PNG") for b in bitmaps]


async def classify(stack: Stack, headers: dict[str, str], data: bytes, ref: str) -> dict[str, Any]:
    r = await stack.client.post(
        "/model/predict", params={"models": ref}, files={"file": ("d.png", data)}, headers=headers
    )
    assert r.status_code == 200, r.text
    return dict(r.json()["results"][ref])


@pytest.mark.parametrize(
    "own_stack", [{"evaluation_in_flight": IN_FLIGHT, "reconcile_interval_seconds": 1.0}], indirect=True
)
async def test_an_evaluation_runs_both_versions_on_the_same_labelled_images(own_stack: Stack) -> None:
    client = own_stack.client
    admin = await login(client, ADMIN_EMAIL, ADMIN_PASSWORD)
    email = "labeller@example.com"
    assert (
        await client.post("/v1/users", json={"email": email, "password": PASSWORD}, headers=admin)
    ).status_code == 201
    user = await login(client, email, PASSWORD)
    await own_stack.start_workers(1, SERVE_MODELS="sketch")

    async def both() -> bool:
        availability = await own_stack.app.state.workers.availability(fresh=True)
        return all(key in availability and availability[key].available for key in ("sketch@1", "sketch@2"))

    await until(both, 60, "both sketch versions served")
    url = "/v1/admin/registry/models/sketch/evaluations"
    r = await client.post(url, json=PAIR, headers=admin)
    assert r.status_code == 409 and "no verdict" in r.json()["detail"], r.text

    # Users label 24 drawings through their verdicts on sketch@1's answers; what each version
    # answers for them, asked directly, is what the evaluation must find.
    truths: list[str] = []
    expected = {1: 0, 2: 0}
    for category in ("apple", "cat", "fish", "bicycle"):
        for data in canvas_drawings(category, 6):
            first = await classify(own_stack, user, data, "sketch@1")
            body: dict[str, Any] = {"prediction_id": first["id"], "is_correct": first["label"] == category}
            if first["label"] != category:
                body["correct_label"] = category
            r = await client.post("/v1/feedback", json=body, headers=user)
            assert r.status_code == 201, r.text
            expected[1] += first["label"] == category
            expected[2] += (await classify(own_stack, user, data, "sketch@2"))["label"] == category
            truths.append(category)
    # A "wrong" without the right label teaches nothing: that image is not evaluated.
    unlabelled = await classify(own_stack, user, canvas_drawings("eye", 1)[0], "sketch@1")
    r = await client.post("/v1/feedback", json={"prediction_id": unlabelled["id"], "is_correct": False}, headers=user)
    assert r.status_code == 201, r.text
    history = (await client.get("/v1/predictions", params={"total": True}, headers=user)).json()["count"]

    engine = make_engine(own_stack.app.state.settings)
    most_in_flight = 0
    # The worker is paused while the evaluation starts, so the bound is seen however fast the
    # small models answer: exactly IN_FLIGHT jobs per version wait, never more, for a while.
    worker_group = os.getpgid(own_stack.workers[0].proc.pid)
    os.killpg(worker_group, signal.SIGSTOP)
    try:
        async with make_sessionmaker(engine)() as session:

            async def in_flight() -> dict[int, int]:
                nonlocal most_in_flight
                counted = await session.execute(
                    select(EvaluationAnswer.model_version, func.count())
                    .where(EvaluationAnswer.status.in_((PredictionStatus.queued.value, PredictionStatus.running.value)))
                    .group_by(EvaluationAnswer.model_version)
                )
                await session.commit()
                numbers = {int(version): int(n) for version, n in counted}
                most_in_flight = max([most_in_flight, *numbers.values()])
                return numbers

            try:
                r = await client.post(url, json=PAIR, headers=admin)
                assert r.status_code == 202, r.text
                started = r.json()
                assert started["status"] == "running" and started["images"] == len(truths) == 24
                assert (started["candidate"]["version"], started["baseline"]["version"]) == (2, 1)

                async def bounded() -> bool:
                    return await in_flight() == {1: IN_FLIGHT, 2: IN_FLIGHT}

                # Within the workers' heartbeat life (3 s in the suite), past a top-up.
                await until(bounded, 2, "the evaluation queued IN_FLIGHT jobs per version")
                await asyncio.sleep(1.2)
                assert await in_flight() == {1: IN_FLIGHT, 2: IN_FLIGHT}
            finally:
                os.killpg(worker_group, signal.SIGCONT)

            async def finished() -> bool:
                await in_flight()
                r = await client.get(f"{url}/{started['id']}", headers=admin)
                assert r.status_code == 200, r.text
                return bool(r.json()["status"] == "done")

            await until(finished, 120, "the evaluation finished")
    finally:
        await engine.dispose()
    assert most_in_flight == IN_FLIGHT

    done = (await client.get(f"{url}/{started['id']}", headers=admin)).json()
    for side, version in (("candidate", 2), ("baseline", 1)):
        result = done[side]
        assert (result["answered"], result["failed"], result["pending"]) == (24, 0, 0), done
        assert result["correct"] == expected[version], (version, done)
        assert result["accuracy"] == round(expected[version] / 24, 4)
    listed = (await client.get(url, headers=admin)).json()
    assert [e["id"] for e in listed] == [started["id"]]
    assert (await client.get("/v1/admin/registry/models/nothing/evaluations", headers=admin)).status_code == 404

    # One running evaluation per pair; a running one can be cancelled.
    # Asked five times at once: one starts, the others are told it runs.
    answers = await asyncio.gather(*(client.post(url, json=PAIR, headers=admin) for _ in range(5)))
    assert sorted(a.status_code for a in answers) == [202, 409, 409, 409, 409], [a.text for a in answers]
    again = next(a for a in answers if a.status_code == 202)
    r = await client.post(f"{url}/{again.json()['id']}/cancel", headers=admin)
    assert r.status_code == 200 and r.json()["status"] == "cancelled" and r.json()["candidate"]["pending"] <= IN_FLIGHT
    assert (await client.post(f"{url}/{again.json()['id']}/cancel", headers=admin)).status_code == 409

    # An evaluation whose versions no worker serves ends (its answers expire) instead of waiting
    # forever: at the API's reconcile look, while no version is retired or disabled.
    rt = runtime_of(own_stack.app)
    rt.settings = rt.settings.model_copy(update={"expire_grace_seconds": 0.0, "evaluation_job_seconds": 0.001})
    assert not [m for m in rt.live_registry.current.models if m.channel == "retired" or not m.enabled]
    async with own_stack.app.state.sessionmaker() as session:
        images = await releases_service.labelled_images(session=session, name="sketch", limit=5)
        stuck = await evaluations.start(
            session=session, name="mobilenet_v2", candidate=2, baseline=1, images=images, requested_by="test"
        )
        await reconcile_once(rt)
        await evaluations.top_up(
            session=session,
            redis=own_stack.app.state.redis,
            store=own_stack.app.state.store,
            in_flight=3,
            job_seconds=10,
            served=set(),
        )
        await session.refresh(stuck)
        ended = await evaluations.summary(session=session, evaluation=stuck)
    assert ended.status == "done" and (ended.candidate.failed, ended.baseline.failed) == (5, 5), ended

    # Two top-ups at once (the result collector's and the reconcile loop's) queue the bound once,
    # and two evaluations against the same baseline share its bound.
    sessionmaker = own_stack.app.state.sessionmaker
    async with sessionmaker() as session:
        raced = [
            (
                await evaluations.start(
                    session=session, name="mobilenet_v2", candidate=c, baseline=1, images=images, requested_by="test"
                )
            ).id
            for c in (2, 3)
        ]

    async def top_up() -> int:
        async with sessionmaker() as session:
            return await evaluations.top_up(
                session=session,
                redis=own_stack.app.state.redis,
                store=own_stack.app.state.store,
                in_flight=2,
                job_seconds=10,
            )

    assert sum(await asyncio.gather(top_up(), top_up(), top_up())) == 3 * 2  # versions 1, 2 and 3
    async with sessionmaker() as session:
        for evaluation_id in raced:
            await evaluations.cancel(session=session, evaluation=await session.get_one(Evaluation, evaluation_id))

    # The comparison counts it, and the user's history holds none of its 48 answers.
    r = await client.get("/v1/admin/registry/models/sketch/compare", params=PAIR, headers=admin)
    comparison = r.json()
    assert comparison["evaluation"]["id"] == started["id"], comparison
    assert any(reason.startswith("accuracy on the same labelled images: ") for reason in comparison["reasons"])
    assert (await client.get("/v1/predictions", params={"total": True}, headers=user)).json()["count"] == history

    assert (await client.post(url, json={"candidate": 9}, headers=admin)).status_code == 404
    assert (await client.post(url, json={"candidate": 3}, headers=admin)).status_code == 409  # the stable one
    r = await client.post("/v1/admin/registry/models/mobilenet_v2/evaluations", json={"candidate": 2}, headers=admin)
    assert (
        r.status_code == 409 and "mobilenet_v2@2 cannot answer now: no live model worker" in r.json()["detail"]
    ), r.text
    assert (await client.post(url, json=PAIR, headers=user)).status_code == 403

    # Images deleted since are left out of its counts, and said so.
    async with own_stack.app.state.sessionmaker() as session:
        image_id = await session.scalar(
            select(EvaluationAnswer.image_id).where(EvaluationAnswer.evaluation_id == uuid.UUID(started["id"])).limit(1)
        )
    assert (await client.delete(f"/v1/images/{image_id}", headers=user)).status_code == 204
    after_delete = (await client.get(f"{url}/{started['id']}", headers=admin)).json()
    assert (after_delete["images"], after_delete["removed"]) == (23, 1), after_delete


async def test_held_out_accuracies_are_compared_only_on_the_same_drawings_enough_of_them(own_stack: Stack) -> None:
    """A run trained on 10 drawings per category is scored on 6: its 100 % says nothing against
    the stable version's 96 % on 1,800, nor against another such run's. Only records naming the
    same held-out set, of at least ``MIN_HELDOUT`` drawings, are compared."""
    from api.app.catalog.service import ModelAvailability
    from contracts.training import heldout_set_id

    six = ["apple", "bicycle", "cat", "diamond", "eye", "fish"]
    full, tiny = heldout_set_id(six, 3000), heldout_set_id(six, 10)

    def served(accuracy: float, heldout_set: str, size: int) -> ModelAvailability:
        return ModelAvailability(
            workers=1, num_classes=6, heldout_accuracy=accuracy, heldout_set=heldout_set, heldout_size=size
        )

    async def compare(candidate: ModelAvailability, baseline: ModelAvailability) -> Any:
        async with own_stack.app.state.sessionmaker() as session:
            return await releases_service.compare(
                session=session,
                name="sketch",
                days=7,
                margin=0.02,
                availability={"sketch@2": candidate, "sketch@1": baseline},
                **PAIR,
            )

    other_drawings = await compare(served(1.0, tiny, 6), served(0.9617, full, 1800))
    assert other_drawings.verdict == "no_evidence", other_drawings
    assert (
        "held-out accuracy: not compared, they were measured on different held-out drawings" in other_drawings.reasons
    )
    too_few = await compare(served(1.0, tiny, 6), served(0.8, tiny, 6))
    assert too_few.verdict == "no_evidence", too_few
    assert f"fewer than {releases_service.MIN_HELDOUT}" in too_few.reasons[0], too_few
    same = await compare(served(0.90, full, 1800), served(0.9617, full, 1800))
    assert same.verdict == "worse" and same.reasons[0].startswith(
        "held-out accuracy: 90.00 % against 96.17 % (worse, margin 2 points)"
    ), same


async def test_a_version_no_worker_serves_is_compared_by_the_classes_it_published(own_stack: Stack) -> None:
    """The stable 20-class version not loaded anywhere still counts its classes from the labels a
    worker published once (``model_versions.labels``): a 6-class candidate is worse, not "no
    evidence", and its promotion is refused."""
    from sqlalchemy import update

    from api.app.catalog.service import ModelAvailability
    from api.app.registry.models import ModelVersion

    twenty = [f"class {i}" for i in range(20)]
    async with own_stack.app.state.sessionmaker() as session:
        await session.execute(
            update(ModelVersion).where(ModelVersion.name == "sketch", ModelVersion.version == 3).values(labels=twenty)
        )
        await session.commit()
        comparison = await releases_service.compare(
            session=session,
            name="sketch",
            candidate=1,
            baseline=None,
            availability={"sketch@1": ModelAvailability(workers=1, num_classes=6)},
            margin=0.02,
            days=7,
        )
    assert (comparison.candidate.classes, comparison.baseline.classes, comparison.verdict) == (6, 20, "worse")


@pytest.mark.usefixtures("everything_served")
async def test_an_evaluation_leaves_out_images_labelled_a_category_either_version_lacks(own_stack: Stack) -> None:
    """A verdict confirmed "giraffe", the answer of a version registered with labels of its own:
    neither sketch@1 nor sketch@3 can answer it, so it would count against both and say nothing
    of either (a 94 % version read 9 %). The evaluation takes only images labelled a category
    both know."""
    client = own_stack.client
    user = await login(client, ADMIN_EMAIL, ADMIN_PASSWORD)
    six = ["apple", "bicycle", "cat", "diamond", "eye", "fish"]
    async with own_stack.app.state.sessionmaker() as session:
        for version, labels in ((1, six), (3, [*six, *(f"class {i}" for i in range(14))])):
            await session.execute(
                update(ModelVersion)
                .where(ModelVersion.name == "sketch", ModelVersion.version == version)
                .values(labels=labels)
            )
        await session.commit()
    for seed, answer in ((501, "cat"), (502, "giraffe")):
        image = (await client.post("/v1/images", files={"file": ("a.png", noise_png(seed, 16))}, headers=user)).json()
        r = await client.post("/v1/predictions", json={"image_id": image["id"], "models": ["sketch@1"]}, headers=user)
        assert r.status_code == 202, r.text
        async with own_stack.app.state.sessionmaker() as session:
            await session.execute(
                update(Prediction)
                .where(Prediction.job_id == uuid.UUID(r.json()["job_id"]))
                .values(status="done", label=answer, score=0.9)
            )
            await session.commit()
        [prediction] = (await client.get(f"/v1/predictions/{r.json()['job_id']}", headers=user)).json()["results"]
        r = await client.post(
            "/v1/feedback", json={"prediction_id": prediction["id"], "is_correct": True}, headers=user
        )
        assert r.status_code == 201, r.text
    async with own_stack.app.state.sessionmaker() as session:
        started = await releases_service.evaluate(
            session=session,
            actor=registry_service.Actor(id=None, email=ADMIN_EMAIL),
            name="sketch",
            candidate=3,
            baseline=1,
            availability={k: ModelAvailability(workers=1, num_classes=6) for k in ("sketch@1", "sketch@3")},
            max_images=10,
        )
    assert started.images == 1, started


async def test_a_version_keeps_the_answers_it_gave_as_a_shadow_and_to_people(own_stack: Stack) -> None:
    """Answers counted for a version are its own and its shadow copies: rolled back into shadow
    (or promoted out of it), it keeps what it answered before."""
    from api.app.catalog.service import ModelAvailability
    from api.app.predictions.models import Prediction, ShadowPrediction
    from tests.api.conftest import stored_job
    from tests.images import noise_png

    client = own_stack.client
    admin = await login(client, ADMIN_EMAIL, ADMIN_PASSWORD)
    me = (await client.get("/v1/users/me", headers=admin)).json()
    image = (await client.post("/v1/images", files={"file": ("n.png", noise_png(64, 3))}, headers=admin)).json()
    _, answered = await stored_job(
        own_stack.app, owner_id=me["id"], image_id=image["id"], status="done", model="sketch"
    )
    async with own_stack.app.state.sessionmaker() as session:
        row = await session.get(Prediction, answered.id)
        assert row is not None
        row.model_version, row.total_ms, row.score = 2, 10.0, 0.5
        session.add(
            ShadowPrediction(
                job_id=row.job_id,
                shadow_of=row.id,
                model_name="sketch",
                model_version=2,
                status="done",
                label="cat",
                score=0.7,
                total_ms=30.0,
            )
        )
        await session.commit()
        comparison = await releases_service.compare(
            session=session,
            name="sketch",
            days=7,
            margin=0.02,
            availability={"sketch@2": ModelAvailability(workers=1, num_classes=6)},
            **PAIR,
        )
    assert comparison.candidate.answers == 2, comparison.candidate
    assert comparison.candidate.latency_p50_ms == 20.0 and comparison.candidate.mean_score == 0.6, comparison.candidate


async def test_the_serving_list_says_a_version_is_retired_or_disabled(own_stack: Stack) -> None:
    """Administration's list of versions says why each is not served in words that help: retired
    or disabled, not nothing, nor "no live model worker" as if a worker were missing."""
    from sqlalchemy import update

    from api.app.catalog.service import ModelAvailability
    from api.app.registry.models import ModelVersion

    async with own_stack.app.state.sessionmaker() as session:
        for version, values in ((1, {"channel": "retired"}), (2, {"enabled": False})):
            await session.execute(
                update(ModelVersion)
                .where(ModelVersion.name == "sketch", ModelVersion.version == version)
                .values(**values)
            )
        await session.commit()
        served = {f"sketch@{v}": ModelAvailability(workers=1, num_classes=6) for v in (1, 2, 3)}
        versions = await releases_service.serving(session=session, availability=served, shares={})
    reasons = {v.version: v.unavailable_reason for v in versions if v.name == "sketch"}
    assert reasons[3] is None, reasons
    assert reasons[1] is not None and reasons[1].startswith("it is retired"), reasons
    assert reasons[2] is not None and reasons[2].startswith("it is disabled"), reasons


HISTORY_TABLES = re.compile(r"\b(?:from|join)\s+(feedback|predictions)\b", re.IGNORECASE)
"""A statement reading the verdicts or the answers themselves, whose number grows with the history."""

LIVE_VERDICTS = text("""
    SELECT p.model_version, count(*), count(*) FILTER (WHERE f.is_correct)
    FROM feedback f JOIN predictions p ON p.id = f.prediction_id
    WHERE p.model_name = 'sketch' AND f.is_correct IS NOT NULL GROUP BY 1
    """)
"""The verdicts on each sketch version counted over the rows, as the serving list once read them."""


@contextmanager
def history_read(engine: AsyncEngine) -> Iterator[list[str]]:
    """The tables of the history (``HISTORY_TABLES``) each statement run on ``engine`` reads, in
    order, while the block runs."""
    tables: list[str] = []

    def seen(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        tables.extend(m.lower() for m in HISTORY_TABLES.findall(statement))

    event.listen(engine.sync_engine, "before_cursor_execute", seen)
    try:
        yield tables
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", seen)


@pytest.mark.parametrize("own_stack", [{"stats_roll_up_seconds": 3600.0}], indirect=True)
async def test_verdict_counts_come_from_the_summaries_exact_before_any_roll_up(own_stack: Stack) -> None:
    """The serving list and the comparison count each version's verdicts from the verdict
    summaries and the changes not folded in yet, not by reading every verdict and answer: right
    at once after a verdict is given, changed or deleted (by itself, with its image, with its
    author), before the roll-up runs (it ran once at start-up, on nothing), and after it."""
    client, app = own_stack.client, own_stack.app
    admin = await login(client, ADMIN_EMAIL, ADMIN_PASSWORD)
    assert (
        await client.post("/v1/users", json={"email": "leaving@example.com", "password": PASSWORD}, headers=admin)
    ).status_code == 201
    leaving = await login(client, "leaving@example.com", PASSWORD)

    async def answers(headers: dict[str, str], version: int, count: int, seed: int) -> tuple[str, list[str]]:
        """An image of the user's with ``count`` answers "cat" of sketch@``version``, one job each."""
        me = (await client.get("/v1/users/me", headers=headers)).json()
        r = await client.post("/v1/images", files={"file": ("n.png", noise_png(seed))}, headers=headers)
        assert r.status_code == 201, r.text
        image_id = r.json()["id"]
        now = datetime.now(UTC)
        ids = []
        async with app.state.sessionmaker() as session:
            for _ in range(count):
                job = Job(
                    owner_id=me["id"],
                    image_id=uuid.UUID(image_id),
                    status="done",
                    deadline_at=now + timedelta(minutes=5),
                    finished_at=now,
                )
                session.add(job)
                await session.flush()
                prediction = Prediction(
                    job_id=job.id, model_name="sketch", model_version=version, status="done", label="cat", score=0.9
                )
                session.add(prediction)
                await session.flush()
                ids.append(str(prediction.id))
            await session.commit()
        return image_id, ids

    async def verdict(headers: dict[str, str], prediction_id: str, correct: bool) -> None:
        r = await client.post(
            "/v1/feedback", json={"prediction_id": prediction_id, "is_correct": correct}, headers=headers
        )
        assert r.status_code == 201, r.text

    _, first = await answers(admin, 1, 23, seed=1)
    _, second = await answers(admin, 2, 20, seed=2)
    kept_apart, with_image = await answers(admin, 2, 2, seed=3)
    _, by_leaving = await answers(leaving, 2, 3, seed=4)
    for i, prediction_id in enumerate(first):
        await verdict(admin, prediction_id, i < 16)  # 16 right, 7 wrong
    for i, prediction_id in enumerate(second):
        await verdict(admin, prediction_id, i < 12)  # 12 right, 8 wrong
    for prediction_id in (*with_image, *by_leaving):
        await verdict(admin if prediction_id in with_image else leaving, prediction_id, True)

    # A verdict said again the other way, one deleted, an image deleted with its answers and their
    # verdicts, a user deleted with theirs.
    await verdict(admin, first[0], False)
    async with app.state.sessionmaker() as session:
        await session.execute(text("DELETE FROM feedback WHERE prediction_id = :id"), {"id": uuid.UUID(first[-1])})
        await session.commit()
    assert (await client.delete(f"/v1/images/{kept_apart}", headers=admin)).status_code == 204
    leaving_id = (await client.get("/v1/users/me", headers=leaving)).json()["id"]
    assert (await client.delete(f"/v1/users/{leaving_id}", headers=admin)).status_code == 204
    expected = {1: (22, 15), 2: (20, 12)}

    async def counted_over_the_rows() -> dict[int, tuple[int, int]]:
        async with app.state.sessionmaker() as session:
            return {int(v): (int(n), int(c)) for v, n, c in await session.execute(LIVE_VERDICTS)}

    async def listed() -> tuple[dict[int, tuple[int, float | None]], list[str]]:
        with history_read(app.state.engine) as tables:
            r = await client.get("/v1/admin/registry/serving", headers=admin)
        assert r.status_code == 200, r.text
        versions = {
            v["version"]: (v["feedback"], v["feedback_accuracy"]) for v in r.json()["versions"] if v["name"] == "sketch"
        }
        return versions, tables

    async def compared() -> tuple[dict[str, Any], list[str]]:
        with history_read(app.state.engine) as tables:
            r = await client.get("/v1/admin/registry/models/sketch/compare", params=PAIR, headers=admin)
        assert r.status_code == 200, r.text
        return r.json(), tables

    def assert_counts(versions: dict[int, tuple[int, float | None]], comparison: dict[str, Any]) -> None:
        for version, (count, correct) in expected.items():
            assert versions[version] == (count, round(correct / count, 4)), versions
        assert versions[3] == (0, None), versions
        for side, version in (("candidate", 2), ("baseline", 1)):
            count, correct = expected[version]
            stats = comparison[side]
            assert (stats["feedback"], stats["feedback_accuracy"]) == (count, pytest.approx(correct / count)), stats

    assert await counted_over_the_rows() == expected
    async with app.state.sessionmaker() as session:
        # The verdicts changed and deleted are not folded into the summary yet.
        assert await session.scalar(text("SELECT count(*) FROM verdict_stat_deltas WHERE verdicts < 0")) >= 4
    versions, listing_read = await listed()
    comparison, comparing_read = await compared()
    assert listing_read == [], listing_read
    # The comparison reads the answers of its window for their latencies, never the verdicts.
    assert "feedback" not in comparing_read, comparing_read
    assert_counts(versions, comparison)
    assert "accuracy on users' verdicts: 60.00 % against 68.18 % (worse, margin 2 points)" in comparison["reasons"]

    # Folded in, and changed again after: summary and changes add up.
    async with app.state.sessionmaker() as session:
        await stats_service.roll_up(session=session)
        assert await session.scalar(text("SELECT count(*) FROM verdict_stat_deltas")) == 0
    await verdict(admin, second[-1], True)
    expected[2] = (20, 13)
    assert await counted_over_the_rows() == expected
    versions, listing_read = await listed()
    comparison, comparing_read = await compared()
    assert listing_read == [] and "feedback" not in comparing_read, (listing_read, comparing_read)
    assert_counts(versions, comparison)


JOB_SECONDS = 4.0


@pytest.mark.parametrize(
    "own_stack",
    [
        {
            "evaluation_job_seconds": JOB_SECONDS,
            "evaluation_in_flight": 2,
            "expire_grace_seconds": 0.0,
            "reconcile_interval_seconds": 0.5,
        }
    ],
    indirect=True,
)
async def test_answers_that_expired_are_no_progress_of_an_evaluation(own_stack: Stack) -> None:
    """A worker serves both versions long enough for the evaluation's first jobs to be queued,
    then goes without answering them. They expire at their deadline; the answers still pending
    expire at the next look, not EVALUATION_JOB_SECONDS later: an answer the API expired is no
    progress, only a worker's answer is."""
    from contracts import workers
    from contracts.messages import ModelState
    from tests.api.test_catalog import _announce

    client = own_stack.client
    admin = await login(client, ADMIN_EMAIL, ADMIN_PASSWORD)
    images = []
    for category in ("eye", "fish", "cat", "apple"):
        [data] = canvas_drawings(category, 1)
        r = await client.post("/v1/images", files={"file": ("d.png", data)}, headers=admin)
        assert r.status_code == 201, r.text
        images.append(evaluations.LabelledImage(uuid.UUID(r.json()["id"]), r.json()["sha256"], category))
    redis = own_stack.app.state.redis
    states = [ModelState(name="sketch", version=v, ready=True, num_classes=6) for v in (1, 2)]
    await _announce(redis, "silent-worker", models=states)
    sessionmaker = own_stack.app.state.sessionmaker
    async with sessionmaker() as session:
        evaluation = await evaluations.start(
            session=session, name="sketch", candidate=2, baseline=1, images=images, requested_by="test"
        )

    async def answers() -> list[EvaluationAnswer]:
        async with sessionmaker() as session:
            rows = await session.scalars(
                select(EvaluationAnswer).where(EvaluationAnswer.evaluation_id == evaluation.id)
            )
            return list(rows)

    async def queued() -> bool:
        return sum(a.status == PredictionStatus.queued.value for a in await answers()) == 4

    await until(queued, 10, "two jobs per version queued")
    async with redis.pipeline(transaction=False) as pipe:
        workers.withdraw(pipe, worker_id="silent-worker")
        await pipe.execute()

    async def ended() -> bool:
        async with sessionmaker() as session:
            return await session.scalar(select(Evaluation.status).where(Evaluation.id == evaluation.id)) == "done"

    await until(ended, 3 * JOB_SECONDS + 10, "the evaluation ended")
    rows = await answers()
    assert {a.status for a in rows} == {PredictionStatus.expired.value}
    at_deadline = [a.finished_at for a in rows if a.deadline_at is not None and a.finished_at is not None]
    stalled = [a.finished_at for a in rows if a.deadline_at is None and a.finished_at is not None]
    assert len(at_deadline) == len(stalled) == 4
    gap = (max(stalled) - max(at_deadline)).total_seconds()
    assert 0 < gap < JOB_SECONDS - 1, gap


ACTOR = registry_service.Actor(None, "operator")


async def _upgraded_past_a_promotion(settings: Settings, fresh_settings: Settings) -> None:
    """sketch@2 promoted over sketch@3, then an upgrade's registry.yaml brings sketch@7 in as the
    stable version (seeding makes @2 a canary at 0: a channel change, not a promotion)."""
    registry = load_registry(settings.registry_path)
    seven = registry.get("sketch@3").model_copy(update={"version": 7, "display_name": None})
    engine = make_engine(fresh_settings)
    try:
        async with make_sessionmaker(engine)() as session:
            await registry_service.seed(session=session, registry=registry)
            await registry_service.promote(
                session=session, actor=ACTOR, name="sketch", version=2, reason="better", available={"sketch@2"}
            )
            await registry_service.seed(
                session=session, registry=registry.model_copy(update={"models": [*registry.models, seven]})
            )
    finally:
        await engine.dispose()


async def test_a_rollback_leaves_one_stable_version(settings: Settings, fresh_settings: Settings) -> None:
    await _upgraded_past_a_promotion(settings, fresh_settings)
    engine = make_engine(fresh_settings)
    try:
        async with make_sessionmaker(engine)() as session:
            changed = await registry_service.rollback(
                session=session, actor=ACTOR, name="sketch", reason="worse", available={"sketch@3"}
            )
            states = {r.version: (r.channel, r.weight) for r in changed.versions}
            # The version the rollback restores is the only stable one: sketch@7 does not split its traffic.
            assert states == {1: ("canary", 0), 2: ("canary", 0), 3: ("stable", 100), 7: ("canary", 0)}, states
            change = await session.scalar(select(RegistryChange).where(RegistryChange.id == changed.revision))
            assert change is not None and change.action == "rollback"
            assert change.before is not None and change.after is not None
            assert (change.before["7"]["channel"], change.after["7"]["channel"]) == ("stable", "canary")
            assert "sketch@7, stable since, made a canary at 0" in change.reason, change.reason
    finally:
        await engine.dispose()


async def test_promoting_one_of_two_stable_versions_makes_it_the_only_one(
    settings: Settings, fresh_settings: Settings
) -> None:
    """Two stable versions (left by an older release's rollback): promoting one is not a
    comparison of it with itself; it ends the split."""
    await _upgraded_past_a_promotion(settings, fresh_settings)
    engine = make_engine(fresh_settings)
    served = {f"sketch@{v}": ModelAvailability(workers=1, num_classes=20) for v in (3, 7)}
    try:
        async with make_sessionmaker(engine)() as session:
            await session.execute(
                update(ModelVersion)
                .where(ModelVersion.name == "sketch", ModelVersion.version == 3)
                .values(channel="stable", weight=100)
            )
            await session.commit()
            changed = await releases_service.promote(
                session=session,
                actor=ACTOR,
                name="sketch",
                version=7,
                reason="one stable version",
                force=False,
                availability=served,
                margin=0.02,
            )
            states = {r.version: (r.channel, r.weight) for r in changed.versions}
            # With all the stable traffic: both stable versions' weights.
            assert states == {1: ("canary", 0), 2: ("canary", 0), 3: ("canary", 0), 7: ("stable", 200)}, states
    finally:
        await engine.dispose()


async def test_a_promoted_version_takes_over_the_stable_weight_and_canaries_keep_their_share(
    settings: Settings, fresh_settings: Settings
) -> None:
    """Weights on any scale: {3: 9000 stable, 1: 500, 2: 500}. Promoting 1 gave it 100, and 2
    got 83 % of the traffic; now 1 takes over 3's weight on top of its own, and 2 keeps its 5 %.
    A rollback gives every version its weight back."""
    engine = make_engine(fresh_settings)
    served = {f"sketch@{v}": ModelAvailability(workers=1) for v in (1, 2, 3)}
    every = set(served)
    registry = load_registry(settings.registry_path)

    def shares(rows: list[ModelVersion]) -> dict[int, float]:
        live = build_registry(rows, registry.default_order, [])
        return {
            v: round(s, 4) for (name, v), s in weight_shares(live, benchmark_mode=False).items() if name == "sketch"
        }

    try:
        async with make_sessionmaker(engine)() as session:
            await registry_service.seed(session=session, registry=registry)
            changed = await registry_service.set_weights(
                session=session,
                actor=ACTOR,
                name="sketch",
                weights={3: 9000, 1: 500, 2: 500},
                reason="x",
                available=every,
            )
            assert shares(changed.versions) == {3: 0.9, 1: 0.05, 2: 0.05}
            changed = await releases_service.promote(
                session=session,
                actor=ACTOR,
                name="sketch",
                version=1,
                reason="better",
                force=False,
                availability=served,
                margin=0.02,
            )
            states = {r.version: (r.channel, r.weight) for r in changed.versions}
            assert states == {1: ("stable", 9500), 2: ("canary", 500), 3: ("canary", 0)}, states
            assert shares(changed.versions) == {1: 0.95, 2: 0.05}
            changed = await registry_service.rollback(
                session=session, actor=ACTOR, name="sketch", reason="worse", available=every, from_version=1
            )
            states = {r.version: (r.channel, r.weight) for r in changed.versions}
            assert states == {1: ("canary", 500), 2: ("canary", 500), 3: ("stable", 9000)}, states

            # Never past the weight an entry holds: the version would drop out of the registry.
            await registry_service.set_weights(
                session=session,
                actor=ACTOR,
                name="sketch",
                weights={3: MAX_WEIGHT, 1: MAX_WEIGHT},
                reason="x",
                available=every,
            )
            changed = await registry_service.promote(
                session=session, actor=ACTOR, name="sketch", version=1, reason="x", available=every
            )
            assert {r.version: r.weight for r in changed.versions} == {1: MAX_WEIGHT, 2: 500, 3: 0}
            assert build_registry(changed.versions, registry.default_order, []).get("sketch@1").weight == MAX_WEIGHT
    finally:
        await engine.dispose()


async def test_two_promotions_at_once_the_second_is_compared_again(
    settings: Settings, fresh_settings: Settings
) -> None:
    """Two admins promote two canaries at once, each compared with the stable version they saw:
    the one that gets the model's rows second is refused (409), since it was never compared with
    the version the first made stable. Before, it became stable all the same (the last won)."""
    from fastapi import HTTPException

    from tests.support import waiting_on_lock

    engine = make_engine(fresh_settings)
    served = {f"sketch@{v}": ModelAvailability(workers=1) for v in (1, 2, 3)}
    registry = load_registry(settings.registry_path)
    sessions = make_sessionmaker(engine)
    try:
        async with sessions() as first, sessions() as second:
            await registry_service.seed(session=first, registry=registry)
            await registry_service._lock_model(first, "sketch")  # the first admin's promotion holds the rows
            promoting = asyncio.create_task(
                releases_service.promote(
                    session=second,
                    actor=ACTOR,
                    name="sketch",
                    version=2,
                    reason="compared with 3",
                    force=False,
                    availability=served,
                    margin=0.02,
                )
            )
            await waiting_on_lock(fresh_settings, 1)
            await registry_service.promote(
                session=first, actor=ACTOR, name="sketch", version=1, reason="x", available=set(served)
            )
            with pytest.raises(HTTPException) as refused:
                await promoting
            assert refused.value.status_code == 409
            assert "sketch's stable version changed meanwhile (now sketch@1)" in refused.value.detail
            rows = await second.scalars(select(ModelVersion).where(ModelVersion.name == "sketch"))
            assert {r.version: r.channel for r in rows} == {1: "stable", 2: "canary", 3: "canary"}
    finally:
        await engine.dispose()
