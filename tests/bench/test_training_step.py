"""``python -m bench.training_step`` times a version's training step in both precisions."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.support import ROOT


def test_it_times_a_step_of_the_versions_recipe_in_both_precisions() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "bench.training_step", "--model", "sketch@1", "--steps", "2"],
        cwd=ROOT,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == "sketch@1: compact at batch 128, 6 classes", lines
    assert lines[1] in ("bfloat16 in hardware: True", "bfloat16 in hardware: False")
    for line, policy in zip(lines[2:], ("float32", "mixed_bfloat16"), strict=True):
        name, _, value = line.partition(": ")
        assert name == policy and value.endswith(" ms per step") and float(value.split()[0]) > 0, line
    refused = subprocess.run(
        [sys.executable, "-m", "bench.training_step", "--model", "mobilenet_v2@1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert refused.returncode != 0 and "no registry version with training options" in refused.stderr
