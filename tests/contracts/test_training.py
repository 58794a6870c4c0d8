"""The training contract's helpers."""

from __future__ import annotations

import math
from typing import cast

import pytest
import yaml

from contracts.training import TrainingEvent, TrainingOptions, record_folder
from tests.support import ROOT


@pytest.mark.parametrize(
    ("template", "folder"),
    [
        ("{trained_dir}/sketch/v1/model.keras", "sketch/v1"),
        ("{trained_dir}/resnet50/v2/model.xml", "resnet50/v2"),
        ("{trained_dir}/model.keras", None),
        ("{models_dir}/inat_bird/model.tflite", None),
        ("/opt/trained/sketch/v1/model.keras", None),
        ("", None),
    ],
)
def test_a_versions_record_is_found_by_its_folder_under_the_trained_dir(template: str, folder: str | None) -> None:
    assert record_folder(template) == folder


def test_runs_train_on_canvas_renderings_by_default() -> None:
    assert TrainingOptions().canvas_share == pytest.approx(0.3)
    with pytest.raises(ValueError):
        TrainingOptions(canvas_share=1.5)


def test_a_run_can_ask_for_the_stable_sketch_recipe() -> None:
    """The options sketch@3's registry entry trains with are options a training run takes too."""
    entries = yaml.safe_load((ROOT / "model" / "registry.yaml").read_text())["models"]
    recipe = next(e for e in entries if (e["name"], e["version"]) == ("sketch", 3))["training"]
    options = TrainingOptions.model_validate({k: v for k, v in recipe.items() if k != "categories"})
    assert options.model_dump(include=set(recipe) - {"categories"}) == {
        k: v for k, v in recipe.items() if k != "categories"
    }
    for bad in (
        {"label_smoothing": 1.0},
        {"warmup": -0.1},
        {"weight_decay": 2.0},
        {"mixed_precision": "yes"},
        {"flip_average": 1},
        {"flip_averge": True},
        {"epochs": "12"},
    ):
        with pytest.raises(ValueError):
            TrainingOptions.model_validate(bad)


def test_an_epoch_whose_numbers_are_not_finite_crosses_the_stream_with_them_as_none() -> None:
    """JSON has no NaN or infinity: a diverged epoch's loss was written as null, which the API's
    reading refused, and the epoch was dropped (the run's progress and ETA went wrong)."""
    numbers: dict[str, float | None] = {
        "epoch": 3.0,
        "seconds": 12.5,
        "loss": math.nan,
        "accuracy": 0.1,
        "val_loss": math.inf,
        "val_accuracy": -math.inf,
    }
    event = TrainingEvent(run_id="x", kind="epoch", epoch=3, epochs=5, numbers=numbers)
    expected = {"epoch": 3.0, "seconds": 12.5, "loss": None, "accuracy": 0.1, "val_loss": None, "val_accuracy": None}
    assert event.numbers == expected
    read = TrainingEvent.from_fields({b"meta": cast(bytes, event.to_fields()["meta"])})
    assert (read.epoch, read.epochs, read.numbers) == (3, 5, expected)
    # A producer's JSON that spells them as JavaScript does reads the same.
    spelt = b'{"run_id": "x", "kind": "epoch", "numbers": {"loss": NaN, "val_loss": Infinity, "accuracy": 0.5}}'
    assert TrainingEvent.from_fields({b"meta": spelt}).numbers == {"loss": None, "val_loss": None, "accuracy": 0.5}


def test_a_progress_event_crosses_the_stream_and_events_without_steps_still_read() -> None:
    """The trainer reports the steps within an epoch every few seconds (``progress``); events of a
    trainer from before then, which have no steps, read as they did."""
    event = TrainingEvent(run_id="x", kind="progress", epoch=2, epochs=5, step=40, steps=300, numbers={"seconds": 61.5})
    read = TrainingEvent.from_fields({b"meta": cast(bytes, event.to_fields()["meta"])})
    assert (read.kind, read.epoch, read.epochs, read.step, read.steps, read.numbers) == (
        "progress",
        2,
        5,
        40,
        300,
        {"seconds": 61.5},
    )
    older = b'{"run_id": "x", "kind": "epoch", "trainer": "t", "epoch": 1, "epochs": 5, "numbers": {"loss": 0.5}}'
    old = TrainingEvent.from_fields({b"meta": older})
    assert (old.kind, old.epoch, old.step, old.steps, old.numbers) == ("epoch", 1, 0, 0, {"loss": 0.5})
