"""Users' labels as training data: one example per image and model, split into train or test once."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import os
from pathlib import Path

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from PIL import Image
from sqlalchemy import delete, select

from api.app.core.config import Settings
from api.app.examples import service as examples
from api.app.examples.models import LabelledExample
from api.app.feedback.export import export_examples, export_feedback
from api.app.feedback.service import backfill_examples
from api.app.predictions import service as predictions_service
from model.training.train_sketch import load_feedback
from tests.api.test_feedback_export import classify, drawing, verdict
from tests.conftest import Users
from tests.images import encode, noise_png
from tests.support import waiting_on_lock


def test_the_split_comes_from_the_hash_alone() -> None:
    hashes = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(10_000)]
    splits = [examples.split_of(h, 0.2) for h in hashes]
    assert abs(splits.count("test") / len(splits) - 0.2) < 0.015
    assert splits == [examples.split_of(h, 0.2) for h in hashes]
    assert {examples.split_of(h, 0.0) for h in hashes} == {"train"}
    assert {examples.split_of(h, 1.0) for h in hashes} == {"test"}


async def _rows(app: FastAPI) -> list[LabelledExample]:
    async with app.state.sessionmaker() as session:
        return list(await session.scalars(select(LabelledExample).order_by(LabelledExample.created_at)))


async def _training_data(app: FastAPI, out: Path) -> dict[str, dict[str, str]]:
    """The rows of a training run's data (``export_examples`` of the sketch model), by sha256."""
    async with app.state.sessionmaker() as session:
        await export_examples(session=session, store=app.state.store, out=out, model="sketch")
    with (out / "feedback.csv").open(newline="", encoding="utf-8") as fh:
        return {r["sha256"]: r for r in csv.DictReader(fh)}


@pytest.mark.usefixtures("worker")
async def test_each_label_is_kept_the_latest_is_the_example_and_the_split_never_changes(
    client: httpx.AsyncClient, app: FastAPI, settings: Settings, users: Users, tmp_path: Path
) -> None:
    async with app.state.sessionmaker() as session:
        await session.execute(delete(LabelledExample))
        await session.commit()
    alice_user, alice = await users.create()
    bob_user, bob = await users.create()
    data = drawing()
    sha256 = hashlib.sha256(data).hexdigest()
    first = (await classify(client, alice, data, "sketch@1"))["results"]["sketch@1"]
    await verdict(client, alice, prediction_id=first["id"], is_correct=True)
    [row] = await _rows(app)
    assert (row.model_name, row.sha256, row.label, row.source) == ("sketch", sha256, first["label"], "verdict")
    assert row.split == examples.split_of(sha256, settings.feedback_test_share)

    # Another user, the same drawing, another label: both labels kept, the later one is the
    # example, the split the same.
    second = (await classify(client, bob, data, "sketch@1"))["results"]["sketch@1"]
    other = next(label for label in ("cat", "fish", "apple") if label != second["label"] and label != first["label"])
    await verdict(client, bob, prediction_id=second["id"], is_correct=False, correct_label=other)
    # A "wrong" without the right label teaches nothing.
    third = (await classify(client, bob, drawing(), "sketch@1"))["results"]["sketch@1"]
    await verdict(client, bob, prediction_id=third["id"], is_correct=False)
    rows = await _rows(app)
    assert [(r.label, r.owner_id, r.split) for r in rows] == [
        (first["label"], alice_user["id"], row.split),
        (other, bob_user["id"], row.split),
    ]

    # The exports carry the split; a training run's data holds the latest label of each drawing.
    out = tmp_path / "export"
    async with app.state.sessionmaker() as session:
        await export_feedback(session=session, store=app.state.store, out=out, model="sketch")
    with (out / "feedback.csv").open(newline="", encoding="utf-8") as fh:
        manifest = {r["sha256"]: r for r in csv.DictReader(fh)}
    assert manifest[sha256]["split"] == row.split and manifest[sha256]["label"] == other
    training = await _training_data(app, tmp_path / "training-1")
    assert (training[sha256]["label"], training[sha256]["split"]) == (other, row.split)
    assert (tmp_path / "training-1" / training[sha256]["path"]).read_bytes() == data

    # Verdicts from before examples existed are filled in once, at start-up, each of them.
    async with app.state.sessionmaker() as session:
        await session.execute(delete(LabelledExample))
        await session.commit()
        # (The suite's database holds other tests' verdicts too: each becomes one example.)
        assert await backfill_examples(session=session, test_share=0.2) >= 2
        assert await backfill_examples(session=session, test_share=0.2) == 0
    rows = [r for r in await _rows(app) if r.sha256 == sha256]
    assert [(r.label, r.split) for r in rows] == [(first["label"], row.split), (other, row.split)]

    # Deleting the image a label came from leaves the labels others gave the same drawing.
    for image in (await client.get("/v1/images", headers=bob)).json()["data"]:
        assert (await client.delete(f"/v1/images/{image['id']}", headers=bob)).status_code == 204
    assert [r.label for r in await _rows(app) if r.sha256 == sha256] == [first["label"]]
    assert (await _training_data(app, tmp_path / "training-2"))[sha256]["label"] == first["label"]

    # A verdict said again without a label takes its label back.
    await verdict(client, alice, prediction_id=first["id"], is_correct=False)
    assert [r for r in await _rows(app) if r.sha256 == sha256] == []
    assert sha256 not in await _training_data(app, tmp_path / "training-3")


def test_the_trainer_learns_from_the_train_split_only(tmp_path: Path) -> None:
    folder = tmp_path / "sketch"
    (folder / "cat").mkdir(parents=True)
    rows = []
    for name, split in (("a.png", "train"), ("b.png", "test"), ("c.png", "train")):
        (folder / "cat" / name).write_bytes(encode(Image.new("L", (28, 28), 255), "PNG"))
        rows.append({"path": f"sketch/cat/{name}", "split": split})
    with (tmp_path / "feedback.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "split"])
        writer.writeheader()
        writer.writerows(rows)
    assert len(load_feedback(folder, ["cat"], split="train")[0]) == 2
    assert len(load_feedback(folder, ["cat"], split="test")[0]) == 1
    assert len(load_feedback(folder, ["cat"])[0]) == 3
    os.remove(tmp_path / "feedback.csv")
    assert len(load_feedback(folder, ["cat"], split="test")[0]) == 0


@pytest.mark.usefixtures("worker")
async def test_an_uploader_may_label_their_own_image(
    client: httpx.AsyncClient, app: FastAPI, users: Users, tmp_path: Path
) -> None:
    async with app.state.sessionmaker() as session:
        await session.execute(delete(LabelledExample))
        await session.commit()
    _, headers = await users.create()
    data = drawing()
    r = await client.post(
        "/model/predict",
        params={"models": "sketch@1", "ground_truth": "dog"},
        files={"file": ("d.png", data)},
        headers=headers,
    )
    assert r.status_code == 422 and "not a label of the chosen models (sketch@1)" in r.json()["detail"], r.text
    assert (await client.get("/v1/images", params={"total": True}, headers=headers)).json()[
        "count"
    ] == 0  # nothing stored

    r = await client.post(
        "/model/predict",
        params={"models": "sketch@1", "ground_truth": "cat"},
        files={"file": ("d.png", data)},
        headers=headers,
    )
    assert r.status_code == 200, r.text
    [image] = (await client.get("/v1/images", headers=headers)).json()["data"]
    assert image["ground_truth"] == "cat"
    [row] = await _rows(app)
    assert (row.model_name, row.label, row.source, str(row.image_id)) == ("sketch", "cat", "ground_truth", image["id"])

    # Given again with a later prediction of the stored image: the latest label counts.
    r = await client.post(
        "/v1/predictions",
        json={"image_id": image["id"], "models": ["sketch@1"], "ground_truth": "fish"},
        headers=headers,
    )
    assert r.status_code == 202, r.text
    assert (await client.get(f"/v1/images/{image['id']}", headers=headers)).json()["ground_truth"] == "fish"
    [row] = await _rows(app)
    assert (row.label, row.split) == ("fish", examples.split_of(image["sha256"], 0.2))
    # A label given with an upload, without any verdict, is training data as a verdict's is.
    training = await _training_data(app, tmp_path / "training")
    assert (training[image["sha256"]]["label"], training[image["sha256"]]["feedback_id"]) == ("fish", "")
    assert (tmp_path / "training" / "sketch" / "fish" / f"{image['sha256']}.png").read_bytes() == data
    r = await client.post(
        "/v1/predictions", json={"image_id": image["id"], "models": ["sketch@1"], "ground_truth": ""}, headers=headers
    )
    assert r.status_code == 422, r.text
    # The one-call upload takes it as a form field too (as it takes ``models``), never from both.
    r = await client.post(
        "/model/predict",
        files={"file": ("d.png", data)},
        data={"models": "sketch@1", "ground_truth": "dog"},
        headers=headers,
    )
    assert r.status_code == 422 and "not a label of the chosen models" in r.json()["detail"], r.text
    r = await client.post(
        "/model/predict",
        params={"ground_truth": "cat"},
        files={"file": ("d.png", data)},
        data={"models": "sketch@1", "ground_truth": "cat"},
        headers=headers,
    )
    assert r.status_code == 422 and "not both" in r.json()["detail"], r.text
    r = await client.post(
        "/model/predict",
        files={"file": ("d.png", data)},
        data={"models": "sketch@1", "ground_truth": "cat"},
        headers=headers,
    )
    assert r.status_code == 200, r.text
    [latest] = (await client.get("/v1/images", params={"limit": 1}, headers=headers)).json()["data"]
    assert latest["ground_truth"] == "cat", latest


@pytest.mark.usefixtures("everything_served")
async def test_two_requests_labelling_the_same_image_for_two_models_in_opposite_orders(
    client: httpx.AsyncClient, app: FastAPI, users: Users, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each labelled example is upserted in the order of the models' names, whatever order the
    request named them in: two requests labelling the same image lock the examples' rows in one
    order and wait for each other instead of deadlocking. An outside transaction holds both rows
    until both requests wait on them. Another user's label of the same content is a row of its
    own, which waits for nothing."""

    async def labels(redis: object, entry: object) -> list[str]:
        return ["cat", "dog"]

    monkeypatch.setattr(predictions_service, "model_labels", labels)
    data = noise_png(41, 24)
    sha = hashlib.sha256(data).hexdigest()
    image_of: dict[str, str] = {}
    headers_of: dict[str, dict[str, str]] = {}
    for who in ("a", "b"):
        _, headers_of[who] = await users.create()
        r = await client.post("/v1/images", files={"file": ("c.png", data)}, headers=headers_of[who])
        assert r.status_code == 201, r.text
        image_of[who] = r.json()["id"]
    both = ["mobilenet_v2@1", "sketch@1"]

    async def label(who: str, models: list[str], truth: str) -> httpx.Response:
        body = {"image_id": image_of[who], "models": models, "ground_truth": truth}
        return await client.post("/v1/predictions", json=body, headers=headers_of[who])

    r = await label("a", both, "cat")  # the two example rows exist from here on
    assert r.status_code == 202, r.text
    conn = await asyncpg.connect(settings.database_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        async with conn.transaction():
            locked = await conn.fetch("SELECT id FROM labelled_examples WHERE sha256 = $1 FOR UPDATE", sha)
            assert len(locked) == 2
            assert (await asyncio.wait_for(label("b", both, "dog"), 30)).status_code == 202
            first = asyncio.create_task(label("a", both, "dog"))
            second = asyncio.create_task(label("a", both[::-1], "cat"))
            await waiting_on_lock(settings, 2)
    finally:
        await conn.close()
    a, b = await asyncio.wait_for(asyncio.gather(first, second), 30)
    assert (a.status_code, b.status_code) == (202, 202), (a.text, b.text)
    # One request labelled both rows after the other: the later one's label is on both.
    async with app.state.sessionmaker() as session:
        rows = (await session.scalars(select(LabelledExample).where(LabelledExample.sha256 == sha))).all()
    mine = [row for row in rows if str(row.image_id) == image_of["a"]]
    assert len({row.label for row in mine}) == 1 and len(mine) == 2
    assert sorted(row.label for row in rows if str(row.image_id) == image_of["b"]) == ["dog", "dog"]
