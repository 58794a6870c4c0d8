"""The drift indices' binning, on samples drawn from known distributions: the same distribution
twice must read as stable (sampling noise is no alarm), a real shift must read as drift."""

from __future__ import annotations

import numpy as np
import pytest

from api.app.drift import service

CLASSES = np.array([f"class{i}" for i in range(1000)])
DRAWS = 200


def _zipf(n: int) -> np.ndarray:
    weights = 1.0 / np.arange(1, n + 1)
    return weights / weights.sum()


def _alarm_rate(shares: np.ndarray | None, rng: np.random.Generator, size: int = 200) -> float:
    alarms = 0
    for _ in range(DRAWS):
        ref = rng.choice(CLASSES, size=size, p=shares)
        win = rng.choice(CLASSES, size=size, p=shares)
        alarms += service.bin_categorical(list(ref), list(win), 10).psi >= service.ALERT
    return alarms / DRAWS


@pytest.mark.parametrize("distribution", ["uniform", "zipf"])
def test_a_1000_class_model_answering_as_before_raises_no_alarm(distribution: str) -> None:
    shares = None if distribution == "uniform" else _zipf(len(CLASSES))
    assert _alarm_rate(shares, np.random.default_rng(7)) <= 0.02


def test_a_move_to_other_classes_is_drift() -> None:
    rng = np.random.default_rng(8)
    before, after = CLASSES[:5], CLASSES[500:505]
    binned = service.bin_categorical(list(rng.choice(before, 200)), list(rng.choice(after, 200)), 10)
    assert binned.psi >= service.ALERT
    # A few classes taking over from a spread-out answer is drift as well.
    binned = service.bin_categorical(list(rng.choice(CLASSES, 200)), list(rng.choice(before, 200)), 10)
    assert binned.psi >= service.ALERT


@pytest.mark.parametrize(("before", "after"), [(28.0, 4032.0), (4032.0, 28.0)])
def test_a_window_outside_a_constant_reference_is_drift(before: float, after: float) -> None:
    binned = service.bin_numeric([before] * 200, [after] * 200, 10)
    assert binned.psi >= service.ALERT
    assert service.bin_numeric([before] * 200, [before] * 200, 10).psi == 0


def test_values_past_either_end_of_the_reference_get_bins_of_their_own() -> None:
    binned = service.bin_numeric(list(range(100)), [-5.0, 50.0, 200.0, 300.0], 4)
    assert binned.reference == pytest.approx([0, 0.25, 0.25, 0.25, 0.25, 0])
    assert binned.window == pytest.approx([0.25, 0, 0, 0.25, 0, 0.5])
    assert binned.labels[0] == "< 0" and binned.labels[-1] == "> 99"
