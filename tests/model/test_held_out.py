"""``python -m model.training.held_out`` scores a trained version on the drawings training held out."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.config import ModelSettings
from model.training import held_out


def test_it_repeats_the_training_records_figures_and_draws_the_misses(
    model_settings: ModelSettings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Same split, same model: its top-1 and top-3 are those training recorded, and the sheet
    holds one tile per drawing the top three miss."""
    record = json.loads((model_settings.trained_dir / "sketch" / "v1" / "metrics.json").read_text())
    sheet = tmp_path / "misses.png"
    assert held_out.main(["--model", "sketch@1", "--sheet", str(sheet)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"sketch@1: {record['samples']['test']} held-out drawings of 6 categories", lines
    figures = {line.split(":")[0]: float(line.split(": ")[1].rstrip("%")) / 100 for line in lines[1:4]}
    assert figures["top-1"] == pytest.approx(record["test_accuracy"], abs=6e-5), lines
    assert figures["top-3"] == pytest.approx(record["test_top3_accuracy"], abs=6e-5), lines
    assert figures["top-1"] <= figures["top-3"] <= figures["top-5"]
    missed = int(lines[4].split(": ")[1].split(";")[0])
    assert missed == round((1 - record["test_top3_accuracy"]) * record["samples"]["test"])
    rows = max(1, math.ceil(missed / held_out.COLUMNS))
    assert Image.open(sheet).size == (held_out.COLUMNS * held_out.TILE, rows * (held_out.TILE + held_out.CAPTION))


def test_ranks_count_from_zero_for_the_first_answer() -> None:
    probabilities = np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])
    assert held_out.ranks(probabilities, np.array([1, 2, 0])).tolist() == [0, 2, 2]


@pytest.mark.parametrize(
    ("ref", "says"),
    [("birds@1", "no registry version with training options"), ("sketch@x", "invalid model version")],
)
def test_a_version_it_cannot_score_is_refused_in_words(ref: str, says: str) -> None:
    with pytest.raises(SystemExit, match=says):
        held_out.main(["--model", ref])


def test_a_version_not_trained_here_yet_is_refused_in_words(
    model_settings: ModelSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRAINED_DIR", str(tmp_path))
    with pytest.raises(SystemExit, match=r"sketch@1: model file .* not found"):
        held_out.main(["--model", "sketch@1"])
