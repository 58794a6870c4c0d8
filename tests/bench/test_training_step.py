"""``python -m bench.training_step`` times a version's training step in both precisions."""

from __future__ import annotations

import sys

import pytest

from bench import training_step


def test_it_times_a_step_of_the_versions_recipe_in_both_precisions(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", ["training_step", "--model", "sketch@1", "--steps", "2"])
    training_step.main()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "sketch@1: compact at batch 128, 6 classes", lines
    assert lines[1] in ("bfloat16 in hardware: True", "bfloat16 in hardware: False")
    for line, policy in zip(lines[2:], ("float32", "mixed_bfloat16"), strict=True):
        name, _, value = line.partition(": ")
        assert name == policy and value.endswith(" ms per step") and float(value.split()[0]) > 0, line
    # A bare name is its stable version, as everywhere else; a version without a recipe is refused.
    monkeypatch.setattr(sys, "argv", ["training_step", "--model", "mobilenet_v2", "--steps", "1"])
    with pytest.raises(SystemExit, match="no registry version with training options"):
        training_step.main()
