"""Drift: is what a model version sees and answers now distributed as it was at first?

Per model version, its first DRIFT_REFERENCE_SIZE answered predictions are the reference (kept once
full: deleting early uploads does not move it) and its latest DRIFT_WINDOW_SIZE after them the
window. Each signal (the top-1 score, the predicted class, the pictures' brightness, contrast,
colour or greyscale, width, height, file size and aspect ratio) is binned the same way in both, and
compared by its population stability index

    PSI = sum_i (a_i - e_i) * ln(a_i / e_i)

with a_i the window's share of bin i, e_i the reference's, and EPSILON for an empty bin (Yurdakul,
"Statistical properties of the population stability index", PhD thesis, Western Michigan
University, 2018; Siddiqi, "Credit Risk Scorecards", Wiley 2006, for the usual reading: below 0.1
stable, 0.1 to 0.25 worth watching, above 0.25 a real shift). Numeric signals are binned at the
reference's quantiles (DRIFT_BINS of them, fewer where values tie), so each reference bin holds
about the same share; the class is binned as the reference's most frequent classes and "other".

A signal is compared only where both the reference and the window hold at least ``min_values``
of its values (MIN_VALUES_PER_BIN per bin): pictures uploaded before their pixel statistics were
taken have none, and a reference of a handful of values reads as drift against any window. Such a
signal is stored with its counts and no index (NaN), and reported with why.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import astuple, dataclass
from datetime import UTC, datetime
from itertools import pairwise
from typing import Any

import numpy as np
from fastapi import HTTPException
from sqlalchemy import and_, delete, select, text, tuple_
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from api.app.core import metrics
from api.app.drift.models import DriftReference, DriftSignal
from api.app.drift.schemas import DriftBin, DriftReport, DriftSignalOut, DriftVersion
from api.app.images.models import Image
from api.app.predictions.models import Job, Prediction
from contracts.messages import PredictionStatus
from contracts.registry import ModelEntry

EPSILON = 1e-4
"""Share given to an empty bin, so that its logarithm is finite."""
WATCH = 0.1
ALERT = 0.25
"""PSI thresholds (Siddiqi 2006): below WATCH stable, from ALERT a shift worth acting on."""
NOT_COMPARED = "not compared"
"""The status of a signal with too few values for an index (``shortfall``), and of a version none
of whose signals has one."""
GREYSCALE_BELOW = 0.02
"""Colourfulness (contracts.imaging.PixelStats) under which a picture counts as greyscale."""


@dataclass(frozen=True)
class Row:
    """What one answered prediction contributes to each signal."""

    score: float | None
    label: str | None
    brightness: float | None
    contrast: float | None
    colourfulness: float | None
    width: int
    height: int
    bytes: int


def _aspect(r: Row) -> float | None:
    return r.width / r.height if r.height else None


def _colour(r: Row) -> str | None:
    if r.colourfulness is None:
        return None
    return "greyscale" if r.colourfulness < GREYSCALE_BELOW else "colour"


NUMERIC: dict[str, Callable[[Row], float | None]] = {
    "top1_score": lambda r: r.score,
    "brightness": lambda r: r.brightness,
    "contrast": lambda r: r.contrast,
    "width": lambda r: float(r.width),
    "height": lambda r: float(r.height),
    "file_size": lambda r: float(r.bytes),
    "aspect_ratio": _aspect,
}
CATEGORICAL: dict[str, Callable[[Row], str | None]] = {
    "predicted_class": lambda r: r.label,
    "colour": _colour,
}
FIXED_CATEGORIES = {"colour": ("colour", "greyscale")}
SIGNALS = (*NUMERIC, *CATEGORICAL)


def psi(expected: Sequence[float], actual: Sequence[float]) -> float:
    """The population stability index of two distributions over the same bins (shares summing to
    1): sum of (a - e) ln(a / e), an empty bin counting EPSILON. 0 for identical distributions;
    symmetric in its arguments."""
    total = 0.0
    for e, a in zip(expected, actual, strict=True):
        e, a = max(e, EPSILON), max(a, EPSILON)
        total += (a - e) * math.log(a / e)
    return total


def status(value: float) -> str:
    """stable (below 0.1), watch (0.1 to 0.25) or drift (above 0.25, as the ``ModelInputDrift``
    alert reads it), the usual thresholds (Yurdakul 2018)."""
    return "drift" if value > ALERT else "watch" if value >= WATCH else "stable"


@dataclass(frozen=True)
class Binned:
    labels: list[str]
    reference: list[float]
    window: list[float]

    @property
    def psi(self) -> float:
        return psi(self.reference, self.window)

    def as_json(self) -> list[dict[str, Any]]:
        return [
            {"label": label, "reference": round(e, 4), "window": round(a, 4)}
            for label, e, a in zip(self.labels, self.reference, self.window, strict=True)
        ]


def _shares(counts: Sequence[float]) -> list[float]:
    n = sum(counts)
    return [c / n if n else 0.0 for c in counts]


def _fmt(value: float, digits: int = 3) -> str:
    """``value`` to ``digits`` significant digits, or as a whole number where that would take an
    exponent (4032 is "4032", not "4.03e+03")."""
    text = f"{value:.{digits}g}"
    return f"{value:.0f}" if "e" in text and 1 <= abs(value) < 1e15 else text


def _edge_labels(values: Sequence[float]) -> list[str]:
    """``values`` (a bin's edges, ascending) printed to the fewest significant digits, 3 or
    more, that tell the distinct ones apart: edges 280.2 and 280.4 are not both "280"."""
    distinct = len(set(values))
    for digits in range(3, 18):  # 17 significant digits tell any two doubles apart
        printed = [_fmt(v, digits) for v in values]
        if len(set(printed)) == distinct:
            return printed
    return [repr(v) for v in values]


OUTER_PSEUDO_COUNT = 0.5
"""Answers added to both samples' bins below and above the reference's range (see bin_numeric)."""


def bin_numeric(reference: Sequence[float], window: Sequence[float], bins: int) -> Binned:
    """Both samples binned at the reference's quantiles (edges shared where values tie), with a bin
    of their own below the reference's minimum and above its maximum: without them a window wholly
    outside the reference's range (every reference value the same, say) would share its bins and
    show no change at all. The reference never falls in those two bins. A value two quantiles tie
    at (it holds at least a bin's share of the reference: a fixed canvas size, one camera's
    width) gets a bin of its own too: sharing one with everything up to the next edge, a window
    that moved off it to anywhere in that range (99 drawings at 280 px and one photo at 1280
    against widths of 500 to 599) showed no change."""
    ref = np.asarray(reference, dtype=np.float64)
    win = np.asarray(window, dtype=np.float64)
    low, high = float(ref.min()), float(ref.max())
    inner = np.quantile(ref, np.linspace(0, 1, bins + 1)[1:-1])
    levels, ties = np.unique(np.concatenate([[low], inner, [high]]), return_counts=True)
    # side="right" below puts a value equal to an edge above it: ``low`` opens the first reference
    # bin, the edge just above a tied value closes its bin, and the edge just above ``high`` the last.
    closing = np.nextafter(np.concatenate([levels[ties > 1], [high]]), np.inf)
    edges = np.unique(np.concatenate([[low], inner, closing]))
    slots = len(edges) + 1
    # Half an answer in each outer bin of both samples: the reference's is otherwise empty, and one
    # extreme picture in a small window would weigh ln(share / EPSILON) as if it were a shift.
    outer = np.zeros(slots)
    outer[[0, -1]] = OUTER_PSEUDO_COUNT
    ref_counts = np.bincount(np.searchsorted(edges, ref, side="right"), minlength=slots) + outer
    win_counts = np.bincount(np.searchsorted(edges, win, side="right"), minlength=slots) + outer
    # An edge closing a bin is printed as the value it stands just above (the maximum, a tied
    # value); a bin of one value is labelled with that value alone.
    shown = [float(np.nextafter(e, -np.inf)) if e in closing else float(e) for e in edges]
    printed = _edge_labels(shown)
    labels = [f"< {printed[0]}"]
    labels += [lo if lo == hi else f"{lo} to {hi}" for lo, hi in pairwise(printed)]
    labels.append(f"> {printed[-1]}")
    return Binned(labels, _shares(ref_counts.tolist()), _shares(win_counts.tolist()))


MIN_CATEGORY_COUNT = 10
"""Answers (reference and window together) a category needs for a bin of its own."""


def bin_categorical(
    reference: Sequence[str], window: Sequence[str], bins: int, fixed: Sequence[str] | None = None
) -> Binned:
    """The ``fixed`` categories, or else at most ``bins - 1`` of the most frequent ones over both
    samples together that have MIN_CATEGORY_COUNT answers there, and "other" for the rest.

    Chosen from the reference alone, the kept categories of a 1000-class model seen 200 times
    would be whichever classes chance put first (each answered once or twice): their shares then
    drop in any window and PSI reads a shift where there is none. Classes with support over both
    samples are the ones whose shares can be compared; a class the window answers often and the
    reference never still gets its own bin, so a move to other classes shows."""
    if fixed is not None:
        kept = list(fixed)
    else:
        combined = Counter(reference) + Counter(window)
        kept = [c for c, n in combined.most_common(bins - 1) if n >= MIN_CATEGORY_COUNT]
    index = {c: i for i, c in enumerate(kept)}
    ref_counts = [0] * (len(kept) + 1)
    win_counts = [0] * (len(kept) + 1)
    for values, counts in ((reference, ref_counts), (window, win_counts)):
        for v in values:
            counts[index.get(v, len(kept))] += 1
    labels = [*kept, "other"]
    if ref_counts[-1] == win_counts[-1] == 0:
        # Every answer has a bin of its own (a fixed set of categories, say): an "other" bin at
        # 0 % against 0 % says nothing, and adds nothing to the index.
        labels, ref_counts, win_counts = labels[:-1], ref_counts[:-1], win_counts[:-1]
    return Binned(labels, _shares(ref_counts), _shares(win_counts))


MIN_VALUES_PER_BIN = 20
"""Values of a signal each of reference and window must hold per bin (``min_values``) for its index
to be computed. Under no change, PSI is about (1/n + 1/m) times a chi-square with k - 1 degrees of
freedom (k bins, n and m values; Yurdakul 2018), so its sampling floor is about
(k - 1)(1/n + 1/m); the chi-square reading itself wants every bin to expect several values, 5 or
more (Cochran, "Some methods for strengthening the common chi-square tests", Biometrics 10(4),
1954). 5 per bin is too few for PSI's thresholds: at 5 bins, 25 reference values against 500 read
0.21 at the median and over ALERT in 37 % of draws from one distribution (3 values: 2.66, and
100 %). At 20 per bin, 100 values at the default 5 bins (each of the reference's quantile bins
holding 20), the reference adds about (bins + 1) / (20 bins), 0.06, to the floor: against 500 from
the same distribution, median 0.062, 99th percentile 0.249, over ALERT in 0.75 % of 400 draws
(200 values: 0.037, 0.12, none). The window is held to the same number."""


def min_values(bins: int) -> int:
    """The values (a count) of one signal each of reference and window needs, at ``bins`` bins."""
    return MIN_VALUES_PER_BIN * bins


def _values(n: int) -> str:
    return f"{n} value" if n == 1 else f"{n} values"


def shortfall(*, reference_count: int, window_count: int, needed: int) -> str | None:
    """Why a signal with ``reference_count`` and ``window_count`` values gets no index ("reference
    holds 3 values; at least 100 needed"), or None where both hold ``needed``."""
    short = [
        f"{side} holds {_values(count)}"
        for side, count in (("reference", reference_count), ("window", window_count))
        if count < needed
    ]
    return f"{' and '.join(short)}; at least {needed} needed" if short else None


@dataclass(frozen=True)
class Compared:
    """One signal of a version: how many values each side held, and its distributions, or (binned
    None) why it was not compared."""

    reference_count: int
    window_count: int
    binned: Binned | None
    reason: str | None


def compare(reference: list[Row], window: list[Row], bins: int) -> dict[str, Compared]:
    """Every signal of SIGNALS: its values' counts in ``reference`` and ``window`` and, where both
    hold ``min_values(bins)``, their distributions; else the reason (``shortfall``)."""
    needed = min_values(bins)
    out: dict[str, Compared] = {}
    for name, numeric in NUMERIC.items():
        ref = [v for r in reference if (v := numeric(r)) is not None]
        win = [v for r in window if (v := numeric(r)) is not None]
        reason = shortfall(reference_count=len(ref), window_count=len(win), needed=needed)
        out[name] = Compared(len(ref), len(win), None if reason else bin_numeric(ref, win, bins), reason)
    for name, category in CATEGORICAL.items():
        ref_c = [c for r in reference if (c := category(r)) is not None]
        win_c = [c for r in window if (c := category(r)) is not None]
        reason = shortfall(reference_count=len(ref_c), window_count=len(win_c), needed=needed)
        binned = None if reason else bin_categorical(ref_c, win_c, bins, FIXED_CATEGORIES.get(name))
        out[name] = Compared(len(ref_c), len(win_c), binned, reason)
    return out


_COLUMNS = (
    Prediction.score,
    Prediction.label,
    Image.brightness,
    Image.contrast,
    Image.colourfulness,
    Image.width,
    Image.height,
    Image.bytes,
)


def _answered(entry: ModelEntry) -> Any:
    # A person's answered predictions only: shadow copies and evaluations live in other tables.
    return (
        select(*_COLUMNS, Prediction.created_at, Prediction.id)
        .join(Job, Prediction.job_id == Job.id)
        .join(Image, Job.image_id == Image.id)
        .where(
            Prediction.model_name == entry.name,
            Prediction.model_version == entry.version,
            Prediction.status == PredictionStatus.done.value,
        )
    )


async def windows(
    *, session: AsyncSession, entry: ModelEntry, reference_size: int, window_size: int
) -> tuple[list[Row], list[Row]] | None:
    """The version's reference (its first ``reference_size`` answered predictions, kept in
    ``drift_references`` once full, so that uploads deleted later neither shrink nor move it) and
    window (its latest ``window_size`` answers after the reference); None until it has both in
    full. A kept reference stays as it was kept, whatever ``reference_size`` is now: a changed
    DRIFT_REFERENCE_SIZE (or two processes told different ones) applies to versions not yet
    given one, and never takes a reference again from what is left. The caller commits."""
    query = _answered(entry)
    kept = await session.get(DriftReference, (entry.name, entry.version))
    if kept is not None:
        reference = [Row(*values) for values in kept.rows]
        boundary = (kept.last_created_at, kept.last_id)
    else:
        ref_rows = (
            await session.execute(query.order_by(Prediction.created_at, Prediction.id).limit(reference_size))
        ).all()
        if len(ref_rows) < reference_size:
            return None
        reference = [Row(*r[:8]) for r in ref_rows]
        boundary = (ref_rows[-1].created_at, ref_rows[-1].id)
        values = {
            "rows": [list(astuple(r)) for r in reference],
            "last_created_at": boundary[0],
            "last_id": boundary[1],
            "frozen_at": datetime.now(UTC),
        }
        stmt = insert(DriftReference).values(model_name=entry.name, model_version=entry.version, **values)
        await session.execute(stmt.on_conflict_do_nothing(index_elements=["model_name", "model_version"]))
    after = tuple_(Prediction.created_at, Prediction.id) > tuple_(*boundary)
    win_rows = (
        await session.execute(
            query.where(and_(after)).order_by(Prediction.created_at.desc(), Prediction.id.desc()).limit(window_size)
        )
    ).all()
    if len(win_rows) < window_size:
        return None
    return reference, [Row(*r[:8]) for r in win_rows]


_exported: set[tuple[str, str, str]] = set()
"""The (model, version, signal) labels this process has set ``portal_drift_psi`` for."""


def export_gauges(rows: Sequence[DriftSignal]) -> None:
    """Sets this process's ``portal_drift_psi`` gauges to the stored indices and forgets the labels
    no longer stored, so a version no longer served stops reporting (and alerting on) its last
    index. prometheus-client cannot remove a label in multiprocess mode (the value stays in the
    process's file): there the gauge is set to NaN, which no threshold matches. A signal stored
    without an index (NaN: too few values) reports none either."""
    current = {(r.model_name, str(r.model_version), r.signal): r.psi for r in rows if not math.isnan(r.psi)}
    for labels, value in current.items():
        metrics.DRIFT_PSI.labels(*labels).set(value)
    multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
    for labels in _exported - current.keys():
        if multiprocess:
            metrics.DRIFT_PSI.labels(*labels).set(math.nan)
        else:
            metrics.DRIFT_PSI.remove(*labels)
    _exported.clear()
    _exported.update(current)


async def refresh(
    *, session: AsyncSession, entries: list[ModelEntry], reference_size: int, window_size: int, bins: int
) -> int:
    """Computes and stores every signal's index of each version in ``entries`` that has both
    windows in full (NaN for a signal with too few values, ``compare``), deletes the stored
    indices this did not compute (versions no longer served), and sets the ``portal_drift_psi``
    gauges from what is left; returns how many versions. Refreshes run one at a time (a
    transaction-level advisory lock): each deletes what is older than its own start, so one
    started meanwhile would delete what the other just wrote. ``session`` must run a transaction (not AUTOCOMMIT, as
    ``make_read_sessionmaker``'s do): the lock is held until the commit here; ValueError otherwise."""
    connection = await session.connection()
    if (
        connection.sync_connection is not None
        and connection.sync_connection.get_execution_options().get("isolation_level") == "AUTOCOMMIT"
    ):
        raise ValueError("a drift refresh needs a session in a transaction, not AUTOCOMMIT")
    await _take_refresh_lock(session)
    now = datetime.now(UTC)
    done = 0
    for entry in entries:
        pair = await windows(session=session, entry=entry, reference_size=reference_size, window_size=window_size)
        if pair is None:
            continue
        reference, window = pair
        rows = []
        for signal, compared in compare(reference, window, bins).items():
            binned = compared.binned
            # A signal not compared is stored too, with its counts: read, it says why it has no
            # index, where leaving it out would say nothing at all.
            rows.append(
                {
                    "model_name": entry.name,
                    "model_version": entry.version,
                    "signal": signal,
                    "psi": math.nan if binned is None else binned.psi,
                    "reference_count": compared.reference_count,
                    "window_count": compared.window_count,
                    "bins": [] if binned is None else binned.as_json(),
                    "computed_at": now,
                }
            )
        if rows:
            stmt = insert(DriftSignal).values(rows)
            await session.execute(
                stmt.on_conflict_do_update(
                    index_elements=["model_name", "model_version", "signal"],
                    set_={
                        c: stmt.excluded[c] for c in ("psi", "reference_count", "window_count", "bins", "computed_at")
                    },
                )
            )
            done += 1
    # Every row this refresh wrote has computed_at = now: an older one is a version (or signal) it
    # no longer computes, whose last index would otherwise be reported, and alerted on, for ever.
    await session.execute(delete(DriftSignal).where(DriftSignal.computed_at < now))
    await session.commit()
    export_gauges(await stored(session=session))
    return done


REFRESH_LOCK_POLL_SECONDS = 0.2
REFRESH_LOCK_WAIT_SECONDS = 60.0
"""The longest a refresh waits for another one (about 1 s at the default window sizes)."""


async def _take_refresh_lock(session: AsyncSession) -> None:
    """Waits for the refresh lock, held until ``session`` commits. Asked for again every
    REFRESH_LOCK_POLL_SECONDS rather than waited for in one statement: a wait longer than the
    driver's command timeout (``core.db.make_engine``) would read as the database being down.
    Raises 409 with Retry-After when another refresh holds it past REFRESH_LOCK_WAIT_SECONDS."""
    query = text("SELECT pg_try_advisory_xact_lock(hashtextextended('drift-refresh', 0))")
    give_up = time.monotonic() + REFRESH_LOCK_WAIT_SECONDS
    # Polled: the holder is another process's transaction, which nothing here can be told about.
    while True:
        if (await session.execute(query)).scalar_one():
            return
        if time.monotonic() >= give_up:
            raise HTTPException(
                status_code=409,
                detail=f"Another drift refresh has run for over {REFRESH_LOCK_WAIT_SECONDS:g} s; "
                "read the indices without refresh, or retry later.",
                headers={"Retry-After": "30"},
            )
        await asyncio.sleep(REFRESH_LOCK_POLL_SECONDS)


async def stored(*, session: AsyncSession) -> list[DriftSignal]:
    """Every stored index, by model, version and signal."""
    return list(
        await session.scalars(
            select(DriftSignal).order_by(DriftSignal.model_name, DriftSignal.model_version, DriftSignal.signal)
        )
    )


def report(
    *, rows: Sequence[DriftSignal], reference_size: int, window_size: int, bins: int, now: datetime
) -> DriftReport:
    """The stored indices (``stored``) as the API gives them, per model version in the order of
    ``rows``; ``bins`` (DRIFT_BINS) gives the values a signal needs (``min_values``), which a
    signal stored without an index (NaN) is said to lack. ``now`` dates ``age_seconds``."""
    needed = min_values(bins)
    versions: dict[tuple[str, int], list[DriftSignal]] = {}
    for row in rows:
        versions.setdefault((row.model_name, row.model_version), []).append(row)
    out = []
    for (name, version), signals in versions.items():
        computed = [r.psi for r in signals if not math.isnan(r.psi)]
        worst = max(computed, default=None)
        computed_at = max(r.computed_at for r in signals)
        out.append(
            DriftVersion(
                model=name,
                version=version,
                # The predictions in each window: a signal's values where every one has it (width
                # always does; a row stored before counts were kept per signal holds the predictions).
                reference_count=max(r.reference_count for r in signals),
                window_count=max(r.window_count for r in signals),
                computed_at=computed_at,
                age_seconds=round((now - computed_at).total_seconds(), 1),
                max_psi=worst,
                status=NOT_COMPARED if worst is None else status(worst),
                signals=[_signal_out(r, needed) for r in signals],
            )
        )
    return DriftReport(
        reference_size=reference_size,
        window_size=window_size,
        min_values=needed,
        watch_threshold=WATCH,
        alert_threshold=ALERT,
        versions=out,
    )


def _signal_out(row: DriftSignal, needed: int) -> DriftSignalOut:
    if not math.isnan(row.psi):
        return DriftSignalOut(
            signal=row.signal,
            psi=row.psi,
            status=status(row.psi),
            reference_count=row.reference_count,
            window_count=row.window_count,
            bins=[DriftBin.model_validate(b) for b in row.bins],
        )
    # None where neither is short of ``needed`` now: stored by a process told another DRIFT_BINS,
    # or before it changed; the next refresh compares it.
    reason = shortfall(reference_count=row.reference_count, window_count=row.window_count, needed=needed)
    return DriftSignalOut(
        signal=row.signal,
        psi=None,
        status=NOT_COMPARED,
        reference_count=row.reference_count,
        window_count=row.window_count,
        reason=reason or f"too few values when computed; at least {needed} needed now",
        bins=[],
    )
