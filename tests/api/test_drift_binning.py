"""The drift indices' binning, on samples drawn from known distributions: the same distribution
twice must read as stable (sampling noise is no alarm), a real shift must read as drift."""

from __future__ import annotations

import numpy as np
import pytest

from api.app.core.config import Settings
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


@pytest.mark.parametrize(
    "reference",
    [
        [280.0] * 99 + [1280.0],  # drawings of the canvas' size and one photo
        [280.0] * 90 + [float(w) for w in range(300, 2300, 200)],
        [float(w) for w in range(100, 280)] + [280.0] * 200 + [float(w) for w in range(1000, 1100)],
    ],
)
def test_a_window_leaving_a_value_the_reference_ties_at_is_drift(reference: list[float]) -> None:
    """Most of the reference at one value, at its minimum or inside its range: that value shared a
    bin with everything up to the next edge, and a window that moved within that bin read 0.0."""
    binned = service.bin_numeric(reference, [500.0 + i % 100 for i in range(100)], 5)
    assert binned.psi >= service.ALERT, binned
    assert "280" in binned.labels, binned.labels
    assert service.bin_numeric(reference, reference, 5).psi == 0


def test_values_past_either_end_of_the_reference_get_bins_of_their_own() -> None:
    binned = service.bin_numeric(list(range(100)), [-5.0, 50.0, 200.0, 300.0], 4)
    # Half an answer in each outer bin of both: one extreme value in a small window is no shift.
    assert binned.reference == pytest.approx([0.5 / 101, *[25 / 101] * 4, 0.5 / 101])
    assert binned.window == pytest.approx([1.5 / 5, 0, 0, 1 / 5, 0, 2.5 / 5])
    assert binned.labels[0] == "< 0" and binned.labels[-1] == "> 99"


SIZES = np.array([(4032, 3024), (3024, 4032), (1920, 1080), (1024, 768), (640, 480), (512, 512), (28, 28)])
"""Widths and heights people's pictures come in (phones both ways up, screenshots, drawings)."""


def _same_population(rng: np.random.Generator, n: int) -> dict[str, list[float] | list[str]]:
    """Every signal of ``n`` answered predictions drawn from one fixed population, as the service
    reads them: continuous ones, tied ones (sizes), a 1000-class answer and colour or greyscale."""
    size = SIZES[rng.choice(len(SIZES), n, p=[0.35, 0.2, 0.15, 0.1, 0.1, 0.05, 0.05])]
    return {
        "top1_score": list(np.minimum(rng.beta(5, 1.5, n), 1.0)),
        "brightness": list(rng.normal(0.45, 0.12, n)),
        "contrast": list(rng.gamma(4.0, 0.05, n)),
        "width": list(size[:, 0].astype(float)),
        "height": list(size[:, 1].astype(float)),
        "file_size": list(np.round(rng.lognormal(13, 0.8, n))),
        "aspect_ratio": list(size[:, 0] / size[:, 1]),
        "predicted_class": list(rng.choice(CLASSES, n, p=_zipf(len(CLASSES)))),
        "colour": list(rng.choice(["colour", "greyscale"], n, p=[0.85, 0.15])),
    }


def test_at_the_default_settings_a_population_answering_as_before_reads_stable() -> None:
    fields = Settings.model_fields
    n, m, bins = (fields[f].default for f in ("drift_reference_size", "drift_window_size", "drift_bins"))
    rng = np.random.default_rng(11)
    values: dict[str, list[float]] = {signal: [] for signal in service.SIGNALS}
    for _ in range(1000):
        ref, win = _same_population(rng, n), _same_population(rng, m)
        for signal in service.NUMERIC:
            values[signal].append(service.bin_numeric(ref[signal], win[signal], bins).psi)  # type: ignore[arg-type]
        for signal in service.CATEGORICAL:
            binned = service.bin_categorical(
                ref[signal], win[signal], bins, service.FIXED_CATEGORIES.get(signal)  # type: ignore[arg-type]
            )
            values[signal].append(binned.psi)
    psi = np.array([values[s] for s in service.SIGNALS])
    alarms = {s: float(np.mean(row >= service.ALERT)) for s, row in zip(service.SIGNALS, psi, strict=True)}
    assert all(rate <= 0.01 for rate in alarms.values()), alarms
    assert np.mean(psi.max(axis=0) >= service.ALERT) <= 0.02
    # Nor does noise alone keep a version on "watch".
    assert np.mean(psi.max(axis=0) >= service.WATCH) <= 0.05, np.mean(psi.max(axis=0) >= service.WATCH)


def test_bin_labels_tell_their_edges_apart() -> None:
    """Values of 279.6 and 280, most of them 280: the edge at 279.92 is not printed "280" beside
    the edge at 280 (bins "280 to 280"), and the bin of 280 alone is labelled "280". Edges are
    given as many significant digits as tell them apart, sizes as whole numbers, not exponents."""
    widths = service.bin_numeric([279.6] * 100 + [280.0] * 400, [280.0] * 3 + [279.6], 5)
    assert widths.labels == ["< 279.6", "279.6 to 279.9", "279.9 to 280", "280", "> 280"]
    assert widths.window == pytest.approx([0.5 / 5, 1 / 5, 0, 3 / 5, 0.5 / 5])
    close = service.bin_numeric([280.1, 280.2, 280.3, 280.4, 280.5, 280.6], [280.0], 5)
    assert close.labels[1:-1] == [f"280.{i} to 280.{i + 1}" for i in range(1, 6)]
    tied = service.bin_numeric([640.0] * 100 + [3024.0] * 100 + [4032.0] * 300, [4032.0], 5)
    assert tied.labels[0] == "< 640" and tied.labels[-2:] == ["4032", "> 4032"], tied.labels
    for binned in (widths, close, tied):
        assert len(set(binned.labels)) == len(binned.labels), binned.labels
        for label in binned.labels:
            low, _, high = label.partition(" to ")
            assert low != high and "e+" not in label, binned.labels


def test_the_status_reads_the_thresholds_as_the_alert_does() -> None:
    """ "drift" exactly when Prometheus' ModelInputDrift would fire (above 0.25), "watch" from 0.1."""
    from pathlib import Path

    rule = (Path(__file__).parents[2] / "observability" / "rules" / "drift.yml").read_text()
    assert f"(portal_drift_psi) > {service.ALERT}" in rule
    assert [service.status(v) for v in (0.0999, 0.1, service.ALERT, service.ALERT + 1e-9)] == [
        "stable",
        "watch",
        "watch",
        "drift",
    ]


def answered_rows(rng: np.random.Generator, n: int, *, pixel_stats: int | None = None) -> list[service.Row]:
    """``n`` answered predictions drawn from ``_same_population``, the first ``pixel_stats`` of
    them (all by default) with brightness, contrast and colourfulness, the rest without (uploads
    stored before those were taken)."""
    values = _same_population(rng, n)
    colourfulness = rng.gamma(2.0, 0.05, n)
    kept = n if pixel_stats is None else pixel_stats
    return [
        service.Row(
            score=float(values["top1_score"][i]),
            label=str(values["predicted_class"][i]),
            brightness=float(values["brightness"][i]) if i < kept else None,
            contrast=float(values["contrast"][i]) if i < kept else None,
            colourfulness=float(colourfulness[i]) if i < kept else None,
            width=int(values["width"][i]),
            height=int(values["height"][i]),
            bytes=int(values["file_size"][i]),
        )
        for i in range(n)
    ]


PIXEL_SIGNALS = ("brightness", "contrast", "colour")
"""The signals uploads stored before their pixel statistics were taken have no value of."""


def test_a_reference_of_three_values_is_not_compared_and_says_why() -> None:
    """Uploads from before pixel statistics were kept: 3 of the reference's 500 pictures have them.
    Binned at 3 values, 500 more from the same population read as drift nearly always (median PSI
    2.7): a lasting false alarm. Not compared, the signal says why, with both counts."""
    rng = np.random.default_rng(21)
    needed = service.min_values(5)
    for _ in range(20):
        compared = service.compare(answered_rows(rng, 500, pixel_stats=3), answered_rows(rng, 500), 5)
        assert set(compared) == set(service.SIGNALS)
        for signal in PIXEL_SIGNALS:
            got = compared[signal]
            assert got.binned is None, (signal, got.binned.psi if got.binned else None)
            assert (got.reference_count, got.window_count) == (3, 500)
            assert got.reason == f"reference holds 3 values; at least {needed} needed"
        # The signals every prediction has are compared as before, and read as no shift.
        for signal in set(service.SIGNALS) - set(PIXEL_SIGNALS):
            got = compared[signal]
            assert got.binned is not None and got.reason is None, (signal, got.reason)
            assert (got.reference_count, got.window_count) == (500, 500)
            assert got.binned.psi < service.ALERT, (signal, got.binned.psi)


def test_a_signal_without_any_value_says_so_and_is_not_left_out() -> None:
    rng = np.random.default_rng(22)
    compared = service.compare(answered_rows(rng, 200, pixel_stats=0), answered_rows(rng, 200, pixel_stats=1), 5)
    assert compared["brightness"].binned is None
    assert compared["brightness"].reason == "reference holds 0 values and window holds 1 value; at least 100 needed"
    assert (compared["brightness"].reference_count, compared["brightness"].window_count) == (0, 1)


@pytest.mark.parametrize("bins", [4, 5])
def test_exactly_the_minimum_of_values_is_compared_and_one_fewer_is_not(bins: int) -> None:
    rng = np.random.default_rng(23)
    needed = service.min_values(bins)
    assert needed == service.MIN_VALUES_PER_BIN * bins
    at = service.compare(answered_rows(rng, 300, pixel_stats=needed), answered_rows(rng, 300, pixel_stats=needed), bins)
    assert at["brightness"].binned is not None and at["brightness"].reason is None
    assert (at["brightness"].reference_count, at["brightness"].window_count) == (needed, needed)
    for reference, window, side in [(needed - 1, needed, "reference"), (needed, needed - 1, "window")]:
        short = service.compare(
            answered_rows(rng, 300, pixel_stats=reference), answered_rows(rng, 300, pixel_stats=window), bins
        )
        assert short["brightness"].binned is None
        assert short["brightness"].reason == f"{side} holds {needed - 1} values; at least {needed} needed"
        assert (short["brightness"].reference_count, short["brightness"].window_count) == (reference, window)


def test_a_reference_of_the_minimum_against_a_full_window_raises_no_alarm() -> None:
    """What the minimum was chosen for (``service.MIN_VALUES_PER_BIN``): at the default 5 bins, a
    signal with just enough values, against a window of 500 from the same population, reads as
    drift in about 1 % of draws (3 values: in all of them)."""
    rng = np.random.default_rng(24)
    needed = service.min_values(Settings.model_fields["drift_bins"].default)
    psi = [
        service.bin_numeric(list(rng.normal(0.45, 0.12, needed)), list(rng.normal(0.45, 0.12, 500)), 5).psi
        for _ in range(DRAWS)
    ]
    assert np.mean(np.array(psi) >= service.ALERT) <= 0.02, np.quantile(psi, [0.5, 0.99])
    few = [
        service.bin_numeric(list(rng.normal(0.45, 0.12, 3)), list(rng.normal(0.45, 0.12, 500)), 5).psi
        for _ in range(DRAWS)
    ]
    assert np.mean(np.array(few) >= service.ALERT) >= 0.95, np.quantile(few, [0.5, 0.99])
