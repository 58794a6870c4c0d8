"""The training contract's helpers."""

from __future__ import annotations

import pytest

from contracts.training import TrainingOptions, record_folder


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
